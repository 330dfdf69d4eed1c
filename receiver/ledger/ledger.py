"""The ledger: deliveries, jobs under leases, and webhook secrets. The single source of truth.

SQLAlchemy Core over SQLite (default, WAL, one file) or PostgreSQL (several machines). Correctness
rests on unique constraints and single-statement claims, never on check-then-insert:

* a delivery is deduplicated by its primary key (the event id) with INSERT … ON CONFLICT DO NOTHING;
* a batch has one job row (primary key batch_id), so it is stored once however many deliveries come;
* a claim is one UPDATE of the oldest due row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, a
  ``BEGIN IMMEDIATE`` write lock on SQLite), guarded by the lease so two workers never hold a job.

The web side and the worker side meet only here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError

from .. import layout
from ..config import WEBHOOK
from ..cooperative import BlockingRunner, run_in_place
from ..errors import LedgerConnectionLost, LedgerUnavailable
from ..manifest import Manifest
from . import counters, migrate
from .engine import READ_ONLY, connection_lost, create_engine, describe, sqlite_path
from .group_commit import GroupCommit, PostgresGroupCommit, SQLiteGroupCommit
from .leases import claim_due
from .outbox import Outbox
from .polling import PollingMixin
from .refused import RefusedDeliveries
from .retention import RetentionMixin
from .schema import (
    DEAD,
    FAILED,
    JOB_STATES,
    QUEUED,
    RUNNING,
    STORED,
    Delivery,
    DeliveryRow,
    Job,
    RecordResult,
    deliveries,
    insert_deliveries,
    jobs,
)
from .secret_box import SecretBox
from .webhook_secrets import WebhookSecrets

if TYPE_CHECKING:
    from ..config import Settings

T = TypeVar("T")


def queue_depth(counts: dict[str, int]) -> int:
    """Jobs waiting for a worker: queued, and failed ones waiting for their retry."""
    return counts[QUEUED] + counts[FAILED]


class Ledger(Outbox, PollingMixin, RefusedDeliveries, RetentionMixin, WebhookSecrets):
    """One per process. Thread-safe (a pooled engine); every method is one short transaction."""

    def __init__(
        self,
        url: str,
        *,
        busy_timeout_seconds: float = 10.0,
        secret_cache_seconds: float = 1.0,
        run_blocking: BlockingRunner = run_in_place,
        auto_migrate: bool = True,
        encryption_keys: tuple[str, ...] = (),
    ) -> None:
        """`run_blocking` runs the SQLite group commit; the web app passes gevent's native thread
        pool (cooperative.blocking_runner) so that waiting for an fsync stops no other request."""
        self.url = url
        self.auto_migrate = auto_migrate
        self._box = SecretBox(encryption_keys)
        self.engine = create_engine(url, busy_timeout_seconds)
        self.dialect = self.engine.dialect.name
        # What the status page and /metrics read runs through (Ledger.read): on SQLite under gevent
        # a native thread with a connection of its own (no pool: the pool's locks are gevent's),
        # since sqlite3 never yields and even a bounded read should stop no other request.
        self._reader: sa.Engine = self.engine
        self._run_reads: BlockingRunner = run_in_place
        if self.dialect == "sqlite" and run_blocking is not run_in_place and sqlite_path(url) not in (None, ":memory:"):
            self._reader, self._run_reads = create_engine(url, busy_timeout_seconds, pooled=False), run_blocking
        self._secret_cache: tuple[float, tuple[str, ...]] | None = None
        self._secret_cache_seconds = secret_cache_seconds
        self._secret_refresh = threading.Lock()
        # Built once: ingest runs this per delivery, and constructing the statement each time
        # costs more than SQLite's insert itself.
        self._record_stmt = insert_deliveries(self._insert, {c: sa.bindparam(c) for c in DeliveryRow._fields})
        # Deliveries are committed in groups (GroupCommit); an in-memory SQLite ledger (tests of
        # one process) commits each on its own.
        path = sqlite_path(url)
        self._group: GroupCommit | None = None
        if self.dialect == "postgresql":
            self._group = PostgresGroupCommit(
                self.engine, lambda conn, batch_id, now: self._queue(conn, batch_id, origin="webhook", now=now, revive=(DEAD,))
            )
        elif path and path != ":memory:":
            self._group = SQLiteGroupCommit(path, busy_timeout_seconds, run_blocking)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Ledger:
        return cls(settings.database_url, auto_migrate=settings.auto_migrate, encryption_keys=settings.encryption_keys, **kwargs)

    # --- schema -----------------------------------------------------------------------------------

    def create_schema(self) -> str | None:
        """Bring the schema up to date (receiver/ledger/migrate.py), or refuse with SchemaOutdated
        when RECEIVER_AUTO_MIGRATE is false; safe when several processes start together. Answers
        the revision the ledger was at (None: an empty database)."""
        try:
            return migrate.upgrade(self.engine, auto=self.auto_migrate)
        except (OperationalError, DBAPIError) as exc:
            raise LedgerUnavailable(f"ledger unavailable: {describe(exc)}") from exc

    def schema_revision(self) -> str | None:
        """The schema's migration revision, without changing anything."""
        with self.connect() as conn:
            return migrate.current(conn)

    def ping(self) -> None:
        with self.connect() as conn:
            conn.execute(sa.select(sa.literal(1)))

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
        self.engine.dispose()
        self._reader.dispose()

    # --- ingest -----------------------------------------------------------------------------------

    def record_delivery(self, delivery: Delivery, *, now: float | None = None) -> RecordResult:
        """Record one delivery and, for a terminal event, queue its batch — in one transaction.

        A redelivery (same event id) changes nothing. A new terminal event for a batch whose job is
        `dead` queues it again: BatchRouter telling us twice is worth another try.
        """
        now = time.time() if now is None else now
        batch_id = delivery.batch_id
        outcome = "accepted" if delivery.terminal else "ignored"
        row = DeliveryRow(delivery.event_id, batch_id, delivery.event_type, delivery.status, outcome, now)
        if self._group is not None:
            return self._group.record(row, queue_batch=delivery.terminal and batch_id is not None)
        with self.begin() as conn:
            if conn.execute(self._record_stmt, row._asdict()).first() is None:
                return RecordResult("duplicate", False)
            if batch_id is not None:
                self._know(conn, batch_id, now)
            if not delivery.terminal or batch_id is None:
                return RecordResult(outcome, False)
            queued = self._queue(conn, batch_id, origin="webhook", now=now, revive=(DEAD,))
        return RecordResult("accepted", queued)

    def enqueue(self, batch_id: str, *, origin: str = "fetch", now: float | None = None) -> bool:
        """Queue a batch by hand (`receiver fetch`): a dead or failed job starts over at once."""
        now = time.time() if now is None else now
        with self.begin() as conn:
            return self._queue(conn, batch_id, origin=origin, now=now, revive=(DEAD, FAILED))

    def _queue(self, conn: Connection, batch_id: str, *, origin: str, now: float, revive: tuple[str, ...]) -> bool:
        stmt = self._insert(jobs).values(
            batch_id=batch_id,
            state=QUEUED,
            attempts=0,
            next_attempt_at=now,
            origin=origin,
            created_at=now,
            updated_at=now,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["batch_id"],
            set_={"state": QUEUED, "attempts": 0, "next_attempt_at": now, "updated_at": now, "last_error": None},
            where=jobs.c.state.in_(revive),
        )
        # RETURNING, not rowcount: drivers disagree on rowcount for ON CONFLICT statements.
        return conn.execute(stmt.returning(jobs.c.batch_id)).first() is not None

    # --- jobs: worker side ------------------------------------------------------------------------

    def claim(self, owner: str, lease_seconds: float, *, batch_id: str | None = None, now: float | None = None) -> Job | None:
        """Take the oldest due job (or `batch_id`'s) under a lease, or None.

        Due means queued or failed with its next attempt in the past, or running under a lease that
        ran out (its worker died). Every claim counts an attempt, so a job that kills its worker
        still ends `dead` instead of looping.
        """
        now = time.time() if now is None else now
        due = sa.or_(
            sa.and_(jobs.c.state.in_((QUEUED, FAILED)), jobs.c.next_attempt_at <= now),
            sa.and_(jobs.c.state == RUNNING, jobs.c.lease_expires_at < now),
        )
        if batch_id is not None:
            due = sa.and_(due, jobs.c.batch_id == batch_id)
        with self.begin() as conn:
            taken = claim_due(
                conn,
                jobs,
                due=due,
                order_by=jobs.c.next_attempt_at,
                values={
                    "state": RUNNING,
                    "lease_owner": owner,
                    "lease_expires_at": now + lease_seconds,
                    "attempts": jobs.c.attempts + 1,
                    "updated_at": now,
                    "planned_at": sa.func.coalesce(jobs.c.planned_at, now),
                    "bytes_so_far": 0,
                },
                returning=(jobs.c.batch_id, jobs.c.state, jobs.c.attempts, jobs.c.lease_owner, jobs.c.planned_at, jobs.c.origin),
            )
        if not taken:
            return None
        row = taken[0]
        return Job(row.batch_id, row.state, row.attempts, row.lease_owner, row.planned_at, row.origin)

    def renew(
        self,
        progress: dict[str, int | None],
        owner: str,
        lease_seconds: float,
        now: float | None = None,
    ) -> set[str]:
        """Extend our leases on the batches in `progress` and note the bytes each attempt has stored
        so far (None: unknown); returns the batch ids whose lease we no longer hold."""
        if not progress:
            return set()
        now = time.time() if now is None else now
        held: set[str] = set()
        with self.begin() as conn:
            for batch_id, done in progress.items():
                renewed = conn.execute(
                    jobs.update()
                    .where(jobs.c.batch_id == batch_id, jobs.c.lease_owner == owner, jobs.c.state == RUNNING)
                    .values(lease_expires_at=now + lease_seconds, bytes_so_far=done)
                    .returning(jobs.c.batch_id)
                ).first()
                if renewed is not None:
                    held.add(batch_id)
        return set(progress) - held

    def mark_stored(self, batch_id: str, owner: str, manifest: Manifest, *, notify: bool | Sequence[str] = ()) -> bool:
        """Record that `manifest` is published for the batch whose lease `owner` holds, and its
        `batch.stored` event, with a delivery for each target in `notify`, in the same transaction
        (the outbox). `notify=True` means the webhook alone (callers from before targets).

        False when the lease was lost meanwhile: the manifest is out there (it is the commit
        marker), and the worker that holds the job now adopts it.
        """
        now = time.time()
        results = manifest.results
        with self.begin() as conn:
            stored = bool(
                conn.execute(
                    jobs.update()
                    .where(jobs.c.batch_id == batch_id, jobs.c.lease_owner == owner)
                    .values(
                        state=STORED,
                        lease_owner=None,
                        lease_expires_at=None,
                        last_error=None,
                        updated_at=now,
                        stored_at=manifest.stored_at.timestamp(),
                        batch_status=manifest.status,
                        manifest_key=layout.manifest_key(batch_id),
                        bytes=manifest.total_bytes,
                        lines=results.lines if results else None,
                        expected_items=manifest.expected_items,
                        counts_match=manifest.counts_match,
                    )
                ).rowcount
            )
            targets = (WEBHOOK,) if notify is True else tuple(notify or ())
            if stored and targets:
                self._add_notification(conn, batch_id, manifest, targets, now)
        return stored

    def mark_failed(self, batch_id: str, owner: str, error: str, *, retry_at: float | None) -> str:
        """Record a failed attempt: `failed` until `retry_at`, or `dead` when `retry_at` is None."""
        now = time.time()
        state = DEAD if retry_at is None else FAILED
        with self.begin() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.batch_id == batch_id, jobs.c.lease_owner == owner)
                .values(
                    state=state,
                    lease_owner=None,
                    lease_expires_at=None,
                    last_error=error[:2000],
                    next_attempt_at=retry_at if retry_at is not None else now,
                    updated_at=now,
                )
            )
        return state

    def forget_job(self, batch_id: str, owner: str) -> None:
        """Delete a job we hold whose batch BatchRouter does not know (a mistyped `receiver fetch`)."""
        with self.begin() as conn:
            conn.execute(jobs.delete().where(jobs.c.batch_id == batch_id, jobs.c.lease_owner == owner))

    def release(self, batch_id: str, owner: str) -> None:
        """Give a job back untouched (SIGTERM): the next worker starts it at once, no attempt spent."""
        now = time.time()
        with self.begin() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.batch_id == batch_id, jobs.c.lease_owner == owner, jobs.c.state == RUNNING)
                .values(
                    state=QUEUED,
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=now,
                    attempts=sa.case((jobs.c.attempts > 0, jobs.c.attempts - 1), else_=0),
                    updated_at=now,
                )
            )

    # --- reading ----------------------------------------------------------------------------------

    def job(self, batch_id: str) -> dict[str, Any] | None:
        with self.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.batch_id == batch_id)).mappings().first()
            return dict(row) if row else None

    def list_jobs(self, limit: int | None = 1000, *, since: float | None = None) -> list[dict[str, Any]]:
        """Jobs, the most recently changed first: at most `limit` (None: every one), changed at or
        after `since`. Ordered by `updated_at` with a LIMIT, so that an index on it makes the
        default `receiver ls` cost the same on a year of history as on a day."""
        query = sa.select(jobs).order_by(jobs.c.updated_at.desc())
        if since is not None:
            query = query.where(jobs.c.updated_at >= since)
        if limit is not None:
            query = query.limit(limit)
        with self.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def has_delivery(self, event_id: str) -> bool:
        """Whether a delivery with this event id was recorded (register's self-test asks this)."""
        with self.connect() as conn:
            found = conn.execute(sa.select(deliveries.c.event_id).where(deliveries.c.event_id == event_id)).first()
        return found is not None

    def event_ids(self, batch_id: str) -> list[str]:
        with self.connect() as conn:
            return list(
                conn.execute(
                    sa.select(deliveries.c.event_id).where(deliveries.c.batch_id == batch_id, deliveries.c.outcome == "accepted")
                ).scalars()
            )

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """Jobs by state, queue depth, stored bytes, the last delivery, deliveries of the last 24
        hours, the latest dead jobs and the notifications, for `receiver status` and metrics.

        Every figure is a counter or an indexed, bounded query: the cost does not grow with history.
        """
        now = time.time() if now is None else now
        return self.read(lambda conn: self.read_stats(conn, counters.read(conn), now), fold=True)

    def read_stats(self, conn: Connection, values: dict[str, float], now: float) -> dict[str, Any]:
        """stats() over an open read (`values`: counters.read), for callers that read more with it."""
        by_state = {state: int(values.get(f"jobs:{state}", 0)) for state in JOB_STATES}
        last = conn.execute(
            sa.select(deliveries.c.received_at, deliveries.c.event_type, deliveries.c.batch_id)
            .order_by(deliveries.c.received_at.desc())
            .limit(1)
        ).first()
        dead = [
            dict(r)
            for r in conn.execute(
                sa.select(jobs.c.batch_id, jobs.c.last_error, jobs.c.attempts)
                .where(jobs.c.state == DEAD)
                .order_by(jobs.c.updated_at.desc())
                .limit(20)
            ).mappings()
        ]
        return {
            "jobs": by_state,
            "queue_depth": queue_depth(by_state),
            "retrying": by_state[FAILED],
            "counts_mismatch": int(values.get("counts_mismatch", 0)),
            "stored_bytes": int(values.get("stored_bytes", 0)),
            "deliveries_24h": delivery_outcomes(conn, since=now - 86400),
            "last_delivery": (
                {"received_at": last.received_at, "event_type": last.event_type, "batch_id": last.batch_id} if last else None
            ),
            "dead": dead,
            "notifications": self._notification_stats(conn, values),
        }

    # --- connections ------------------------------------------------------------------------------
    # Public so that the ledger's read-side modules (reports.py) and its mixins use one way in, and a
    # database error always surfaces as LedgerUnavailable.

    def _insert(self, table: sa.Table):
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A write transaction, committed on leaving the block (on SQLite it takes the write lock up
        front: see engine.py)."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, DBAPIError, DisconnectionError) as exc:
            raise self._unavailable(exc) from exc

    def read(self, fn: Callable[[Connection], T], *, fold: bool = False) -> T:
        """`fn` over a read-only transaction, run where it stops no other request (on SQLite under
        gevent: a native thread). With `fold`, PostgreSQL's counter deltas are folded in first
        (counters.fold), so that reading them stays O(1)."""

        def run() -> T:
            if fold:
                self.fold_counters()
            with self.connect(self._reader) as conn:
                return fn(conn)

        return self._run_reads(run)

    def fold_counters(self) -> int:
        """Fold PostgreSQL's pending counter deltas now (housekeeping does it every round, so deltas
        never pile up on a ledger nobody scrapes); how many delta rows were folded."""
        if self.dialect != "postgresql":
            return 0
        with self.begin() as conn:
            return counters.fold(conn)

    @contextmanager
    def connect(self, engine: sa.Engine | None = None) -> Iterator[Connection]:
        """A read-only transaction: on SQLite a deferred one, which in WAL mode never waits for a
        writer (every other transaction takes the write lock up front; see engine.py)."""
        try:
            with (engine or self.engine).connect().execution_options(**{READ_ONLY: True}) as conn:
                yield conn
                conn.rollback()
        except (OperationalError, DBAPIError, DisconnectionError) as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> LedgerUnavailable:
        """The named error for a database failure: LedgerConnectionLost when the connection itself
        went (the worker retries those while its lease lasts), LedgerUnavailable otherwise."""
        kind = LedgerConnectionLost if connection_lost(exc, self.dialect) else LedgerUnavailable
        return kind(f"ledger unavailable: {describe(exc)}")


def delivery_outcomes(conn: Connection, *, since: float) -> dict[str, int]:
    """Deliveries recorded since `since`, by outcome: a window over the received_at index, so its
    cost follows the traffic of the window, not the history kept."""
    rows = conn.execute(
        sa.select(deliveries.c.outcome, sa.func.count()).where(deliveries.c.received_at > since).group_by(deliveries.c.outcome)
    ).all()
    return {outcome: int(n) for outcome, n in rows}

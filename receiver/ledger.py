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

import dataclasses
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from .cooperative import BlockingRunner, ready_first, run_in_place
from .errors import LedgerError, LedgerUnavailable, UnsupportedDatabase

try:
    import fcntl
except ImportError:  # Windows: SQLite's own lock alone
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 1

#: Job states. `failed` waits for its next attempt; `dead` waits for an operator (`receiver fetch`).
QUEUED, RUNNING, FAILED, STORED, DEAD = "queued", "running", "failed", "stored", "dead"
JOB_STATES = (QUEUED, RUNNING, FAILED, STORED, DEAD)

metadata = sa.MetaData()

schema_info = sa.Table(
    "schema_info",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("event_id", sa.String(255), primary_key=True),
    sa.Column("batch_id", sa.String(255), nullable=True, index=True),
    sa.Column("event_type", sa.String(255), nullable=False),
    sa.Column("status", sa.String(255), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False, index=True),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("batch_id", sa.String(255), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("lease_owner", sa.String(255), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("origin", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    #: Chosen once, at the first attempt, so a retry on another day overwrites the same keys.
    sa.Column("planned_at", sa.Float, nullable=True),
    sa.Column("stored_at", sa.Float, nullable=True),
    sa.Column("batch_status", sa.String(64), nullable=True),
    sa.Column("manifest_key", sa.String(1024), nullable=True),
    sa.Column("bytes", sa.BigInteger, nullable=True),
    sa.Column("lines", sa.BigInteger, nullable=True),
    sa.Column("expected_items", sa.BigInteger, nullable=True),
    sa.Column("counts_match", sa.Boolean, nullable=True),
    sa.Index("ix_jobs_due", "state", "next_attempt_at"),
)

secrets = sa.Table(
    "webhook_secrets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("secret", sa.String(512), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    #: NULL while current; set on rotation to the end of the grace period.
    sa.Column("expires_at", sa.Float, nullable=True),
)


@dataclasses.dataclass(frozen=True)
class Job:
    batch_id: str
    state: str
    attempts: int
    lease_owner: str | None
    planned_at: float | None
    origin: str


@dataclasses.dataclass(frozen=True)
class RecordResult:
    """What ingest answers: `accepted`, `duplicate` or `ignored`, and whether a job was queued."""

    outcome: str
    job_queued: bool


@dataclasses.dataclass(frozen=True)
class SecretInfo:
    id: int
    created_at: float
    expires_at: float | None


class Ledger:
    """One per process. Thread-safe (a pooled engine); every method is one short transaction."""

    def __init__(
        self,
        url: str,
        *,
        busy_timeout_seconds: float = 10.0,
        secret_cache_seconds: float = 1.0,
        run_blocking: BlockingRunner = run_in_place,
    ) -> None:
        """`run_blocking` runs the SQLite group commit; the web app passes gevent's native thread
        pool (cooperative.blocking_runner) so that waiting for an fsync stops no other request."""
        self.url = url
        self.engine = _create_engine(url, busy_timeout_seconds)
        self.dialect = self.engine.dialect.name
        self._secret_cache: tuple[float, tuple[str, ...]] | None = None
        self._secret_cache_seconds = secret_cache_seconds
        self._secret_refresh = threading.Lock()
        # Built once: ingest runs this per delivery, and constructing the statement each time
        # costs more than SQLite's insert itself.
        self._record_stmt = (
            self._insert(deliveries)
            .values({c: sa.bindparam(c) for c in ("event_id", "batch_id", "event_type", "status", "outcome", "received_at")})
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(deliveries.c.event_id)
        )
        # Deliveries are committed in groups (_GroupCommit); an in-memory SQLite ledger (tests of
        # one process) commits each on its own.
        path = _sqlite_path(url)
        self._group: _GroupCommit | None = None
        if self.dialect == "postgresql":
            self._group = _PostgresGroupCommit(
                self.engine, lambda conn, batch_id, now: self._queue(conn, batch_id, origin="webhook", now=now, revive=(DEAD,))
            )
        elif path and path != ":memory:":
            self._group = _SQLiteGroupCommit(path, busy_timeout_seconds, run_blocking)

    # --- schema -----------------------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create the tables if missing; safe when several processes start on an empty ledger."""
        with self._begin() as conn:
            if self.dialect == "postgresql":
                # Serialise concurrent creators; the lock ends with the transaction.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(727274)"))
            metadata.create_all(conn, checkfirst=True)
            found = conn.execute(sa.select(schema_info.c.version).where(schema_info.c.id == 1)).scalar()
            if found is None:
                conn.execute(self._insert(schema_info).values(id=1, version=SCHEMA_VERSION).on_conflict_do_nothing())
            elif found > SCHEMA_VERSION:
                raise LedgerError(
                    f"the ledger has schema version {found}, newer than this receiver's {SCHEMA_VERSION}; upgrade the receiver"
                )

    def ping(self) -> None:
        with self._connect() as conn:
            conn.execute(sa.select(sa.literal(1)))

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
        self.engine.dispose()

    # --- ingest -----------------------------------------------------------------------------------

    def record_delivery(
        self,
        *,
        event_id: str,
        event_type: str,
        batch_id: str | None,
        status: str | None,
        terminal: bool,
        now: float | None = None,
    ) -> RecordResult:
        """Record one delivery and, for a terminal event, queue its batch — in one transaction.

        A redelivery (same event id) changes nothing. A new terminal event for a batch whose job is
        `dead` queues it again: BatchRouter telling us twice is worth another try.
        """
        now = time.time() if now is None else now
        outcome = "accepted" if terminal else "ignored"
        if self._group is not None:
            return self._group.record(
                (event_id, batch_id, event_type, status, outcome, now), queue_batch=terminal and batch_id is not None
            )
        params = {
            "event_id": event_id,
            "batch_id": batch_id,
            "event_type": event_type,
            "status": status,
            "outcome": outcome,
            "received_at": now,
        }
        with self._begin() as conn:
            if conn.execute(self._record_stmt, params).first() is None:
                return RecordResult("duplicate", False)
            if not terminal or batch_id is None:
                return RecordResult(outcome, False)
            queued = self._queue(conn, batch_id, origin="webhook", now=now, revive=(DEAD,))
        return RecordResult("accepted", queued)

    def enqueue(self, batch_id: str, *, origin: str = "fetch", now: float | None = None) -> bool:
        """Queue a batch by hand (`receiver fetch`): a dead or failed job starts over at once."""
        now = time.time() if now is None else now
        with self._begin() as conn:
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

    # --- secrets ----------------------------------------------------------------------------------

    def accepted_secrets(self, now: float | None = None, max_age: float | None = None) -> tuple[str, ...]:
        """Secrets `register` stored that are current or inside their grace period.

        Cached for about a second (`max_age` asks for a fresher answer): ingest calls this on every
        delivery. One caller refreshes an expired cache while the others keep the previous answer a
        moment longer: under gevent hundreds of requests would otherwise all query the database
        (and wait for its connections) in the same instant.
        """
        now = time.time() if now is None else now
        max_age = self._secret_cache_seconds if max_age is None else max_age
        cached = self._secret_cache
        if cached is not None and now - cached[0] < max_age:
            return cached[1]
        if cached is not None and not self._secret_refresh.acquire(blocking=False):
            return cached[1]  # another caller is refreshing it
        if cached is None:
            self._secret_refresh.acquire()
        try:
            cached = self._secret_cache
            if cached is not None and now - cached[0] < max_age:
                return cached[1]  # refreshed while we waited
            return self._read_secrets(now)
        finally:
            self._secret_refresh.release()

    def _read_secrets(self, now: float) -> tuple[str, ...]:
        with self._connect() as conn:
            rows = conn.execute(
                sa.select(secrets.c.secret)
                .where(sa.or_(secrets.c.expires_at.is_(None), secrets.c.expires_at > now))
                .order_by(secrets.c.id.desc())
            ).scalars()
            values = tuple(rows)
        self._secret_cache = (now, values)
        return values

    def add_secret(self, secret: str, *, grace_seconds: float, now: float | None = None) -> None:
        """Make `secret` current; every other current secret stays accepted for `grace_seconds`."""
        now = time.time() if now is None else now
        with self._begin() as conn:
            conn.execute(
                secrets.update()
                .where(secrets.c.expires_at.is_(None))
                .values(expires_at=now + grace_seconds)
            )
            conn.execute(secrets.insert().values(secret=secret, created_at=now, expires_at=None))
        self._secret_cache = None

    def current_secret(self) -> str | None:
        with self._connect() as conn:
            return conn.execute(
                sa.select(secrets.c.secret).where(secrets.c.expires_at.is_(None)).order_by(secrets.c.id.desc()).limit(1)
            ).scalar()

    def secret_info(self, now: float | None = None) -> list[SecretInfo]:
        """Ages of the accepted secrets, never their values (for `receiver status`)."""
        now = time.time() if now is None else now
        with self._connect() as conn:
            rows = conn.execute(
                sa.select(secrets.c.id, secrets.c.created_at, secrets.c.expires_at)
                .where(sa.or_(secrets.c.expires_at.is_(None), secrets.c.expires_at > now))
                .order_by(secrets.c.id.desc())
            )
            return [SecretInfo(r.id, r.created_at, r.expires_at) for r in rows]

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
        pick = sa.select(jobs.c.batch_id).where(due)
        if batch_id is not None:
            pick = pick.where(jobs.c.batch_id == batch_id)
        pick = pick.order_by(jobs.c.next_attempt_at).limit(1)
        if self.dialect == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        with self._begin() as conn:
            row = conn.execute(
                jobs.update()
                .where(jobs.c.batch_id == pick.scalar_subquery())
                .values(
                    state=RUNNING,
                    lease_owner=owner,
                    lease_expires_at=now + lease_seconds,
                    attempts=jobs.c.attempts + 1,
                    updated_at=now,
                    planned_at=sa.func.coalesce(jobs.c.planned_at, now),
                )
                .returning(jobs.c.batch_id, jobs.c.state, jobs.c.attempts, jobs.c.lease_owner, jobs.c.planned_at, jobs.c.origin)
            ).first()
        if row is None:
            return None
        return Job(row.batch_id, row.state, row.attempts, row.lease_owner, row.planned_at, row.origin)

    def renew(self, batch_ids: list[str], owner: str, lease_seconds: float, now: float | None = None) -> set[str]:
        """Extend our leases; returns the batch ids whose lease we no longer hold."""
        if not batch_ids:
            return set()
        now = time.time() if now is None else now
        with self._begin() as conn:
            held = set(
                conn.execute(
                    jobs.update()
                    .where(jobs.c.batch_id.in_(batch_ids), jobs.c.lease_owner == owner, jobs.c.state == RUNNING)
                    .values(lease_expires_at=now + lease_seconds)
                    .returning(jobs.c.batch_id)
                ).scalars()
            )
        return set(batch_ids) - held

    def mark_stored(
        self,
        batch_id: str,
        owner: str,
        *,
        batch_status: str,
        manifest_key: str,
        stored_at: float,
        bytes_: int | None,
        lines: int | None,
        expected_items: int | None,
        counts_match: bool | None,
    ) -> bool:
        now = time.time()
        with self._begin() as conn:
            return bool(
                conn.execute(
                    jobs.update()
                    .where(jobs.c.batch_id == batch_id, jobs.c.lease_owner == owner)
                    .values(
                        state=STORED,
                        lease_owner=None,
                        lease_expires_at=None,
                        last_error=None,
                        updated_at=now,
                        stored_at=stored_at,
                        batch_status=batch_status,
                        manifest_key=manifest_key,
                        bytes=bytes_,
                        lines=lines,
                        expected_items=expected_items,
                        counts_match=counts_match,
                    )
                ).rowcount
            )

    def mark_failed(self, batch_id: str, owner: str, error: str, *, retry_at: float | None) -> str:
        """Record a failed attempt: `failed` until `retry_at`, or `dead` when `retry_at` is None."""
        now = time.time()
        state = DEAD if retry_at is None else FAILED
        with self._begin() as conn:
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

    def release(self, batch_id: str, owner: str) -> None:
        """Give a job back untouched (SIGTERM): the next worker starts it at once, no attempt spent."""
        now = time.time()
        with self._begin() as conn:
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
        with self._connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.batch_id == batch_id)).mappings().first()
            return dict(row) if row else None

    def list_jobs(self, limit: int = 1000) -> list[dict[str, Any]]:
        with self._connect() as conn:
            rows = conn.execute(sa.select(jobs).order_by(jobs.c.created_at.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows]

    def has_delivery(self, event_id: str) -> bool:
        """Whether a delivery with this event id was recorded (register's self-test asks this)."""
        with self._connect() as conn:
            found = conn.execute(sa.select(deliveries.c.event_id).where(deliveries.c.event_id == event_id)).first()
        return found is not None

    def event_ids(self, batch_id: str) -> list[str]:
        with self._connect() as conn:
            return list(
                conn.execute(
                    sa.select(deliveries.c.event_id).where(deliveries.c.batch_id == batch_id, deliveries.c.outcome == "accepted")
                ).scalars()
            )

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """Queue depth, retries, failures and the last delivery, for `receiver status` and metrics."""
        now = time.time() if now is None else now
        with self._connect() as conn:
            by_state = dict(conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)).all())
            retrying = conn.execute(
                sa.select(sa.func.count()).where(jobs.c.state == FAILED)
            ).scalar_one()
            mismatched = conn.execute(
                sa.select(sa.func.count()).where(jobs.c.counts_match.is_(False))
            ).scalar_one()
            stored_bytes = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(jobs.c.bytes), 0))).scalar_one()
            last = conn.execute(
                sa.select(deliveries.c.received_at, deliveries.c.event_type, deliveries.c.batch_id)
                .order_by(deliveries.c.received_at.desc())
                .limit(1)
            ).first()
            deliveries_24h = conn.execute(
                sa.select(deliveries.c.outcome, sa.func.count())
                .where(deliveries.c.received_at > now - 86400)
                .group_by(deliveries.c.outcome)
            ).all()
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
            "jobs": {state: int(by_state.get(state, 0)) for state in JOB_STATES},
            "queue_depth": int(by_state.get(QUEUED, 0)) + int(retrying),
            "retrying": int(retrying),
            "counts_mismatch": int(mismatched),
            "stored_bytes": int(stored_bytes),
            "deliveries_24h": {outcome: int(n) for outcome, n in deliveries_24h},
            "last_delivery": (
                {"received_at": last.received_at, "event_type": last.event_type, "batch_id": last.batch_id} if last else None
            ),
            "dead": dead,
        }

    def prune_deliveries(self, retention_days: int, now: float | None = None) -> int:
        """Forget delivery records past their retention; jobs (stored batches) are kept for ever."""
        now = time.time() if now is None else now
        with self._begin() as conn:
            return conn.execute(deliveries.delete().where(deliveries.c.received_at < now - retention_days * 86400)).rowcount

    # --- plumbing ---------------------------------------------------------------------------------

    def _insert(self, table: sa.Table):
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, DBAPIError) as exc:
            raise LedgerUnavailable(f"ledger unavailable: {_describe(exc)}") from exc

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A read-only transaction: on SQLite a deferred one, which in WAL mode never waits for a
        writer (every other transaction takes the write lock up front; see _create_engine)."""
        try:
            with self.engine.connect().execution_options(**{_READ_ONLY: True}) as conn:
                yield conn
                conn.rollback()
        except (OperationalError, DBAPIError) as exc:
            raise LedgerUnavailable(f"ledger unavailable: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    """The driver's message without the SQL and parameters (which may include a secret)."""
    return (str(getattr(exc, "orig", exc)).splitlines() or [repr(exc)])[0][:300]


def _sqlite_path(url: str) -> str | None:
    """The file of an `sqlite:///path` URL (or ":memory:"), None for any other database."""
    return url.split(":///", 1)[1] if url.startswith("sqlite") else None


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, busy_timeout_seconds: float) -> None:
    """The settings every SQLite connection of the ledger runs with, pooled or the committer's."""
    # We issue BEGIN ourselves: pysqlite's implicit transactions would start deferred and fail with
    # "database is locked" when two writers upgrade at once.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a 200 is sent only after the delivery survives a power cut, not just a crash.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_seconds * 1000)}")
    cur.close()


@dataclasses.dataclass
class _Pending:
    """One delivery waiting for a group commit, and what it answers."""

    params: tuple[Any, ...]
    queue_batch: bool
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: Set (with `done`) when this delivery's thread is to commit the next group itself.
    lead: bool = False
    result: RecordResult | None = None
    error: LedgerUnavailable | None = None


class _GroupCommit:
    """Records one process's deliveries in groups: one transaction, one fsync, many 200s.

    Why (BENCHMARKS.md, "Ingest"): with synchronous=FULL (SQLite) or synchronous_commit (PostgreSQL)
    every commit waits for an fsync. Sixteen gunicorn threads each committing their own delivery to
    SQLite spent 90% of their time asleep in its busy handler and reached 283 deliveries/s; on
    PostgreSQL each delivery cost four round trips and ~2 ms of the worker's CPU.

    So the requests of a process commit for each other (leader and followers, no extra thread): a
    request that finds no commit running commits every delivery waiting at that moment, its own
    included, in one transaction; requests arriving meanwhile wait, and the first of them leads the
    next group. On an idle receiver a delivery commits alone, at once.

    What ingest promises is unchanged: each delivery and its job are in a committed transaction
    before `record` returns, so before the 200; deduplication is still the primary key with ON
    CONFLICT, a duplicate inside one group included. When the database fails (locked past the busy
    timeout, disk full, connection lost) every delivery of the group gets LedgerUnavailable, so a
    503, and BatchRouter retries; any other failure is retried one delivery at a time, so that only
    the one at fault fails. tests/test_ledger.py runs the same tests on both databases.

    Subclasses say how a group is written (`_commit_group`), which errors mean the database itself
    failed (`_is_outage`) and how to start afresh after one (`_reset`).
    """

    #: Rows per multi-row INSERT: 6 parameters each stays far below SQLite's 32,766 variables (and
    #: PostgreSQL's 65,535 parameters).
    ROWS_PER_INSERT = 500

    def __init__(self, run_blocking: BlockingRunner = run_in_place) -> None:
        self._run_blocking = run_blocking
        self._ready_first = ready_first()
        self._lock = threading.Lock()
        self._waiting: list[_Pending] = []
        self._busy = False  # a leader is committing
        self._closed = False
        self._pid = os.getpid()

    def record(self, params: tuple[Any, ...], *, queue_batch: bool) -> RecordResult:
        item = _Pending(params, queue_batch)
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's connection is not ours
                self._pid, self._waiting, self._busy = os.getpid(), [], False
                self._forget()
            if self._closed:
                raise LedgerUnavailable("ledger unavailable: it was closed")
            self._waiting.append(item)
            lead = not self._busy
            self._busy = True
        if not lead:
            item.done.wait()
        if lead or item.lead:
            self._lead()
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if not self._busy and self._pid == os.getpid():
                self._reset()

    def _lead(self) -> None:
        """Commit every delivery waiting now, wake their threads, hand the lead to the next one."""
        # Under gevent the other requests of the process run only when this one waits: let those
        # that are ready reach the queue first. Leading at once committed groups of one delivery,
        # then of the rest, two commits where one does (BENCHMARKS.md: +10-19% deliveries/s).
        self._ready_first()
        with self._lock:
            group, self._waiting = self._waiting, []
        try:
            self._run_blocking(lambda: self._commit_group(group))
        except Exception as exc:  # the database, or a bug: either way no request may wait for ever
            self._reset()  # a fresh connection for what follows
            if len(group) > 1 and not self._is_outage(exc):
                # Not the database (locked, full, gone) but maybe one delivery's data: one at a time,
                # so that only the delivery at fault fails.
                for item in group:
                    self._commit_alone(item)
            else:
                error = _unavailable(exc)
                for item in group:
                    item.error = error
        with self._lock:
            successor = self._waiting[0] if self._waiting else None
            if successor is None:
                self._busy = False
                if self._closed:
                    self._reset()
            else:
                successor.lead = True
        # The next leader first: under gevent a set() queues the waiter behind those set before it,
        # and the group's requests each write a response and parse the next request before
        # yielding, so waking it last left no commit in flight for all that time.
        if successor is not None:
            successor.done.set()
        for item in group:
            item.done.set()

    def _commit_alone(self, item: _Pending) -> None:
        item.result = None
        try:
            self._run_blocking(lambda: self._commit_group([item]))
        except Exception as exc:
            self._reset()
            item.error = _unavailable(exc)

    def _commit_group(self, group: list[_Pending]) -> None:
        raise NotImplementedError

    def _is_outage(self, exc: Exception) -> bool:
        raise NotImplementedError

    def _reset(self) -> None:
        """Drop connections and locks after a failure or at close (never during a commit)."""

    def _forget(self) -> None:
        """After a fork: the parent's connections are not ours to use or to close."""


def _unavailable(exc: Exception) -> LedgerUnavailable:
    return LedgerUnavailable(f"ledger unavailable: {_describe(exc)}")


def _settle(
    group: list[_Pending],
    rows_per_insert: int,
    insert: Callable[[list[_Pending]], Iterable[str]],
    queue_job: Callable[[str, float], bool],
) -> None:
    """Record a group inside the caller's transaction and give every delivery its answer.

    `insert` adds a chunk of deliveries (ON CONFLICT DO NOTHING) and returns the event ids it
    inserted; `queue_job` queues a terminal delivery's batch and says whether it did.
    """
    firsts: dict[str, _Pending] = {}
    for item in group:
        if item.params[0] in firsts:
            item.result = _DUPLICATE  # the same event twice in one group: the first one counts
        else:
            firsts[item.params[0]] = item
    unique = list(firsts.values())
    inserted: set[str] = set()
    for start in range(0, len(unique), rows_per_insert):
        inserted.update(insert(unique[start : start + rows_per_insert]))
    for item in unique:
        if item.params[0] not in inserted:
            item.result = _DUPLICATE
        elif not item.queue_batch:
            item.result = RecordResult(item.params[4], False)
        else:
            batch_id, now = item.params[1], item.params[5]
            item.result = RecordResult("accepted", queue_job(batch_id, now))


class _SQLiteGroupCommit(_GroupCommit):
    """The group commit on SQLite, through sqlite3 directly (SQLAlchemy's own work was ~0.4 ms a
    commit). Processes take turns on a flock beside the database rather than SQLite's polling. The
    SQL below is the SQLite form of `Ledger._record_stmt` and `Ledger._queue(revive=(DEAD,))`.
    """

    INSERT_DELIVERIES = (
        "INSERT INTO deliveries (event_id, batch_id, event_type, status, outcome, received_at) VALUES {rows} "
        "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
    )
    QUEUE_JOB = (
        "INSERT INTO jobs (batch_id, state, attempts, next_attempt_at, origin, created_at, updated_at) "
        f"VALUES (?1, '{QUEUED}', 0, ?2, 'webhook', ?2, ?2) "
        f"ON CONFLICT (batch_id) DO UPDATE SET state = '{QUEUED}', attempts = 0, next_attempt_at = ?2, "
        f"updated_at = ?2, last_error = NULL WHERE jobs.state = '{DEAD}' RETURNING batch_id"
    )

    def __init__(self, path: str, busy_timeout_seconds: float, run_blocking: BlockingRunner = run_in_place) -> None:
        super().__init__(run_blocking)
        self._path = path
        self._busy_timeout = busy_timeout_seconds
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    def _is_outage(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.OperationalError)

    def _forget(self) -> None:
        self._conn, self._lock_fd = None, None

    def _commit_group(self, group: list[_Pending]) -> None:
        """Only files and sqlite3 here, no locks or events of the requests, so that it may run on
        another native thread (`run_blocking`)."""
        with self._turn():
            self._commit(self._connection(), group)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout, check_same_thread=False)
            _sqlite_pragmas(conn, self._busy_timeout)
            self._conn = conn
        return self._conn

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """Take turns with the other processes' leaders on a lock file beside the database.

        SQLite's own lock makes a waiting writer poll, sleeping 1, 2, 5, 10 ms and more between
        tries; a blocked flock(2) wakes the moment the lock is released. Only these group commits
        take it; every other write relies on SQLite's lock (and its busy timeout) alone.
        """
        if fcntl is None:
            yield
            return
        if self._lock_fd is None:
            self._lock_fd = os.open(self._path + "-commit.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _commit(self, conn: sqlite3.Connection, group: list[_Pending]) -> None:
        """One transaction for the group, in as few statements as possible.

        Each statement releases the GIL and must win it back, which can cost milliseconds in a busy
        process, so the deliveries go in one multi-row INSERT rather than one INSERT each. Only
        terminal events (about one per batch) add a statement: their job. Progress events only, in
        one statement, need no BEGIN and COMMIT: a single statement is its own transaction in
        autocommit mode (atomic, and durable at its end with synchronous=FULL).
        """
        alone = len(group) <= self.ROWS_PER_INSERT and not any(item.queue_batch for item in group)
        if not alone:
            conn.execute("BEGIN IMMEDIATE")
        try:
            _settle(
                group,
                self.ROWS_PER_INSERT,
                lambda chunk: [
                    row[0]
                    for row in conn.execute(
                        self.INSERT_DELIVERIES.format(rows=", ".join(["(?, ?, ?, ?, ?, ?)"] * len(chunk))),
                        [v for item in chunk for v in item.params],
                    )
                ],
                lambda batch_id, now: bool(conn.execute(self.QUEUE_JOB, (batch_id, now)).fetchall()),
            )
            if not alone:
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the connection is closed and replaced by the caller
            raise


class _PostgresGroupCommit(_GroupCommit):
    """The group commit on PostgreSQL, through the ledger's pooled engine. psycopg waits
    cooperatively under gevent, so it runs in place; several processes and machines commit side
    by side (PostgreSQL's row locks serialize what must be)."""

    def __init__(self, engine: Engine, queue: Callable[[Connection, str, float], bool]) -> None:
        super().__init__(run_in_place)
        self._engine = engine
        self._queue = queue

    def _is_outage(self, exc: Exception) -> bool:
        return isinstance(exc, (OperationalError, InterfaceError))

    def _commit_group(self, group: list[_Pending]) -> None:
        columns = ("event_id", "batch_id", "event_type", "status", "outcome", "received_at")
        with self._engine.begin() as conn:
            _settle(
                group,
                self.ROWS_PER_INSERT,
                lambda chunk: conn.execute(
                    postgresql.insert(deliveries)
                    .values([dict(zip(columns, item.params)) for item in chunk])
                    .on_conflict_do_nothing(index_elements=["event_id"])
                    .returning(deliveries.c.event_id)
                ).scalars(),
                lambda batch_id, now: self._queue(conn, batch_id, now),
            )


_DUPLICATE = RecordResult("duplicate", False)


#: Execution option marking a connection that only reads (Ledger._connect).
_READ_ONLY = "receiver_read_only"


def _create_engine(url: str, busy_timeout_seconds: float) -> Engine:
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        if path and path != ":memory:":
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
        engine = sa.create_engine(
            url,
            connect_args={"timeout": busy_timeout_seconds, "check_same_thread": False},
            pool_size=8,
            max_overflow=24,
            pool_timeout=busy_timeout_seconds,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            _sqlite_pragmas(dbapi_conn, busy_timeout_seconds)

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock up front, so contention waits (busy_timeout) instead
            # of failing half-way through a transaction. Reads need no lock (WAL) and take none.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    if url.startswith(("postgresql", "postgres")):
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://") :]
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise UnsupportedDatabase(
                "DATABASE_URL", "PostgreSQL needs psycopg: pip install 'batchrouter-receiver[postgres]'"
            ) from None
        # A fixed pool: under gevent a web process may have hundreds of requests in flight, and
        # overflow connections (opened and closed per checkout, a PostgreSQL backend forked each
        # time) cost more than waiting for one of 16 (bench_ingest --database-url: 394/s -> 521/s).
        return sa.create_engine(url, pool_size=16, max_overflow=0, pool_pre_ping=True)
    raise UnsupportedDatabase("DATABASE_URL", "use sqlite:///path.db or postgresql://…")


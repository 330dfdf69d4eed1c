"""Retention: what the ledger keeps, for how long, and the small steps that remove the rest.

Every table has a rule (a setting with a minimum that keeps what correctness needs):

* deliveries: `RECEIVER_DELIVERY_RETENTION_DAYS` (event-id deduplication of BatchRouter's 24 h of
  retries);
* job attempts: `RECEIVER_ATTEMPT_RETENTION_DAYS` (the status page's windows);
* an event's body once every target has sent it (or given up): `RECEIVER_NOTIFICATION_RETENTION_DAYS`
  (the row and its webhook-id stay; a replay after that rebuilds the body from the manifest, see
  Outbox.replay_notification);
* stored jobs, settled events and their deliveries, and known batches no longer polled:
  `RECEIVER_JOB_RETENTION_DAYS`;
* refused-delivery minutes: `RECEIVER_REFUSED_RETENTION_DAYS`.

What is never pruned: jobs that are not stored (queued, running, failed, dead: in flight or waiting
for an operator), events still pending, batches still watched, and webhook secrets (one row per
rotation). A delivery for a batch whose rows were pruned queues its job again; the worker confirms
the batch, finds its manifest in storage (the record of what was stored) and adopts it, downloading
nothing.

Every step removes at most `limit` rows, chosen by primary key through an index in one short
transaction, so no step holds a lock for long or blocks writers, and the first prune after a backlog
is many small deletes, never one huge one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..config import RetentionSettings
from .schema import (
    ENDED,
    NOT_FOUND,
    PENDING,
    STORED,
    WATCHING,
    deliveries,
    job_attempts,
    jobs,
    known_batches,
    notification_deliveries,
    notifications,
    refused_deliveries,
)

DAY = 86400.0

#: Rows per transaction: small enough that a step holds SQLite's write lock for milliseconds.
STEP_ROWS = 2000

#: `length(body) > 0` as literal SQL, the same text as the partial index ix_notifications_body_kept,
#: so both SQLite's and PostgreSQL's planners see that the index covers the query.
_HOLDS_BODY = sa.text("length(body) > 0")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Rows of `table` (named by `key`) that `where` says are past their time; `drop` empties
    those columns instead of deleting the rows."""

    name: str
    setting: str
    days: int
    table: sa.Table
    key: sa.Column[Any]
    where: sa.ColumnElement[bool]
    #: Oldest first where one index gives that order; None where sorting would cost a scan.
    order: sa.Column[Any] | None
    drop: dict[str, Any] | None = None


def notification_rules(policy: RetentionSettings, now: float) -> list[Rule]:
    """The outbox's rules. An event's body goes after the notification retention once no target's
    delivery of it is pending; its settled deliveries after the job retention, and then the event
    itself (with its webhook-id). Nothing a target still has to send is touched."""
    d = notification_deliveries.c
    pending = sa.exists().where(d.batch_id == notifications.c.batch_id, d.state == PENDING)
    job_cutoff = now - policy.job_days * DAY
    return [
        Rule(
            "notification bodies",
            "RECEIVER_NOTIFICATION_RETENTION_DAYS",
            policy.notification_days,
            notifications,
            notifications.c.batch_id,
            sa.and_(notifications.c.created_at < now - policy.notification_days * DAY, _HOLDS_BODY, ~pending),
            notifications.c.created_at,
            drop={"body": b""},
        ),
        Rule(
            "notification deliveries",
            "RECEIVER_JOB_RETENTION_DAYS",
            policy.job_days,
            notification_deliveries,
            # Two-column key: (batch, target) pairs are picked by batch id, the condition rechecked.
            d.batch_id,
            sa.and_(d.retry_from < job_cutoff, d.state != PENDING),
            d.retry_from,
        ),
        Rule(
            "notifications",
            "RECEIVER_JOB_RETENTION_DAYS",
            policy.job_days,
            notifications,
            notifications.c.batch_id,
            # Once none of its deliveries is kept (the rule above removes them, in any order).
            sa.and_(
                notifications.c.created_at < job_cutoff,
                ~sa.exists().where(
                    d.batch_id == notifications.c.batch_id, sa.or_(d.state == PENDING, d.retry_from >= job_cutoff)
                ),
            ),
            notifications.c.created_at,
        ),
    ]


def rules(policy: RetentionSettings, now: float) -> list[Rule]:
    """Every table's rule, in the order a prune runs them."""
    job_cutoff = now - policy.job_days * DAY
    return [
        Rule(
            "deliveries",
            "RECEIVER_DELIVERY_RETENTION_DAYS",
            policy.delivery_days,
            deliveries,
            deliveries.c.event_id,
            deliveries.c.received_at < now - policy.delivery_days * DAY,
            deliveries.c.received_at,
        ),
        Rule(
            "job attempts",
            "RECEIVER_ATTEMPT_RETENTION_DAYS",
            policy.attempt_days,
            job_attempts,
            job_attempts.c.id,
            job_attempts.c.finished_at < now - policy.attempt_days * DAY,
            job_attempts.c.finished_at,
        ),
        *notification_rules(policy, now),
        # Before the jobs: a batch still marked watched (polling off, or the poller has not ended
        # it yet) but with a job is done with polling; without a job it is still polled, and kept.
        Rule(
            "known batches",
            "RECEIVER_JOB_RETENTION_DAYS",
            policy.job_days,
            known_batches,
            known_batches.c.batch_id,
            sa.and_(
                known_batches.c.state.in_((ENDED, NOT_FOUND, WATCHING)),
                known_batches.c.first_seen_at < job_cutoff,
                sa.or_(known_batches.c.state != WATCHING, sa.exists().where(jobs.c.batch_id == known_batches.c.batch_id)),
            ),
            None,  # three states: ordering by age would sort every candidate before the LIMIT
        ),
        Rule(
            "stored jobs",
            "RECEIVER_JOB_RETENTION_DAYS",
            policy.job_days,
            jobs,
            jobs.c.batch_id,
            sa.and_(jobs.c.state == STORED, jobs.c.updated_at < job_cutoff),
            jobs.c.updated_at,
        ),
        Rule(
            "refused deliveries",
            "RECEIVER_REFUSED_RETENTION_DAYS",
            policy.refused_days,
            refused_deliveries,
            refused_deliveries.c.minute,
            refused_deliveries.c.minute < int((now - policy.refused_days * DAY) // 60),
            refused_deliveries.c.minute,
        ),
    ]


@dataclasses.dataclass(frozen=True)
class TableSize:
    """One ledger table in `receiver db stats`: rows, and bytes with its indexes (None: unknown)."""

    table: str
    rows: int
    bytes: int | None


def _no_pause(step_seconds: float) -> bool:
    return True


class RetentionMixin:
    """Methods of :class:`~receiver.ledger.Ledger` for retention (see the module)."""

    if TYPE_CHECKING:  # provided by Ledger
        dialect: str

        def begin(self) -> AbstractContextManager[Connection]: ...
        def connect(self) -> AbstractContextManager[Connection]: ...

    def prune_step(self, rule: Rule, *, limit: int = STEP_ROWS) -> int:
        """Remove (or empty) at most `limit` of `rule`'s rows, oldest first, in one transaction;
        returns how many.

        The keys are read first through the rule's index, then the rows are removed by primary key
        with the condition checked again, so a row that changed meanwhile stays. Two statements,
        not a DELETE with a subquery: PostgreSQL planned that one as a join of the table with
        itself when its statistics were stale after a mass update (2 s for 2,000 jobs)."""
        pick = sa.select(rule.key).where(rule.where).limit(limit)
        if rule.order is not None:
            pick = pick.order_by(rule.order)
        if self.dialect == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        with self.begin() as conn:
            keys = list(conn.execute(pick).scalars())
            if not keys:
                return 0
            target = sa.and_(rule.key.in_(keys), rule.where)
            if rule.drop is None:
                return conn.execute(rule.table.delete().where(target)).rowcount
            if self.dialect == "postgresql":
                return conn.execute(rule.table.update().where(target).values(**rule.drop)).rowcount
            return _reinsert_emptied(conn, rule, target)

    def prune_steps(
        self, policy: RetentionSettings, *, now: float | None = None, limit: int = STEP_ROWS
    ) -> Iterator[tuple[Rule, int]]:
        """One step of every rule, then again while any rule had a full step: yields (rule, rows)
        after each step so the caller can pause between them (or stop)."""
        now = time.time() if now is None else now
        pending = rules(policy, now)
        while pending:
            again = []
            for rule in pending:
                removed = self.prune_step(rule, limit=limit)
                yield rule, removed
                if removed >= limit:
                    again.append(rule)
            pending = again

    def prune(
        self,
        policy: RetentionSettings,
        *,
        now: float | None = None,
        limit: int = STEP_ROWS,
        pause: Callable[[float], bool] = _no_pause,
    ) -> dict[str, int]:
        """Remove everything past its retention now, in steps of `limit` rows; rows removed by
        rule name. The one prune loop: `receiver db prune` and the worker's housekeeping differ
        only in `pause`.

        After each step, `pause(seconds)` is called with the seconds the step took (0 after a step
        that removed nothing: there is nothing to make room after); it waits as long as it likes
        for ingest and claims to take the ledger, and returns False to stop the prune there."""
        removed: dict[str, int] = {}
        started = time.monotonic()
        for rule, count in self.prune_steps(policy, now=now, limit=limit):
            removed[rule.name] = removed.get(rule.name, 0) + count
            if not pause(time.monotonic() - started if count else 0.0):
                break
            started = time.monotonic()
        return removed

    def prune_backlog(self, policy: RetentionSettings, *, now: float | None = None) -> dict[str, int]:
        """What a prune would remove now, by rule name (`db prune --dry-run`, `db stats`)."""
        now = time.time() if now is None else now
        with self.connect() as conn:
            return {
                rule.name: int(conn.execute(sa.select(sa.func.count()).select_from(rule.table).where(rule.where)).scalar_one())
                for rule in rules(policy, now)
            }

    def table_sizes(self) -> list[TableSize]:
        """Rows and bytes (with indexes) of every ledger table, largest first (`db stats`).

        Counting rows reads each table whole: an operator's command, never run per request."""
        from .schema import metadata

        with self.connect() as conn:
            sizes = _table_bytes(conn, self.dialect, [t.name for t in metadata.sorted_tables])
            found = [
                TableSize(t.name, int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()), sizes.get(t.name))
                for t in metadata.sorted_tables
            ]
        return sorted(found, key=lambda s: (-(s.bytes or 0), -s.rows, s.table))


def _reinsert_emptied(conn: Connection, rule: Rule, target: sa.ColumnElement[bool]) -> int:
    """SQLite: empty columns by deleting the rows and inserting them again without them.

    An UPDATE that shrinks a row leaves its B-tree page as allocated as before (SQLite rebalances
    pages on delete, not on an update in place), and new rows are appended elsewhere, so dropped
    bodies would free nothing: 3,000 events of 1.2 kB, 2,800 emptied, kept 4.1 MB by UPDATE and
    0.34 MB by delete and insert (the freed pages go to the free list, which new rows reuse)."""
    kept = [c for c in rule.table.c if c.name not in (rule.drop or {})]
    rows = [dict(r) for r in conn.execute(sa.select(*kept).where(target)).mappings()]
    if not rows:
        return 0
    conn.execute(rule.table.delete().where(rule.key.in_([r[rule.key.name] for r in rows])))
    conn.execute(rule.table.insert(), [{**r, **(rule.drop or {})} for r in rows])
    return len(rows)


def _table_bytes(conn: Connection, dialect: str, names: list[str]) -> dict[str, int]:
    """Bytes on disk per table, indexes included: pg_total_relation_size on PostgreSQL, the
    `dbstat` virtual table on SQLite when it is compiled in (most builds), else nothing."""
    if dialect == "postgresql":
        return {
            name: int(conn.execute(sa.text("SELECT pg_total_relation_size(CAST(:t AS regclass))"), {"t": name}).scalar_one())
            for name in names
        }
    try:
        rows = conn.execute(
            sa.text(
                "SELECT coalesce(m.tbl_name, s.name), sum(s.pgsize) FROM dbstat AS s "
                "LEFT JOIN sqlite_master AS m ON m.name = s.name GROUP BY 1"
            )
        ).all()
    except sa.exc.OperationalError:  # no such table: dbstat (SQLite built without it)
        return {}
    return {str(name): int(size) for name, size in rows if name in names}

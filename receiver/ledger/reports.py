"""What the operator reads: the status page's queries and the figures `/metrics` derives from rows.

Kept apart from ledger.py (the write path the hook and the worker depend on): everything here is a
read, except :func:`record_attempt`, the one row the worker adds per finished attempt so that
retries, throughput and attempt history are counted for every worker on every host in one place.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from .ledger import Ledger, job_counts, queue_depth
from .schema import DEAD, FAILED, QUEUED, RUNNING, STORED, deliveries, job_attempts, jobs

#: Buckets of the job duration histogram (seconds from first claim to stored).
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
#: Buckets of the bytes-per-job histogram.
BYTES_BUCKETS = tuple(float(1024**2 * n) for n in (1, 10, 100, 1024, 10 * 1024, 100 * 1024))


def record_attempt(
    ledger: Ledger,
    *,
    batch_id: str,
    attempt: int,
    outcome: str,
    cause: str | None,
    bytes_: int | None,
    seconds: float | None,
    now: float | None = None,
) -> None:
    """Note one finished attempt (stored, failed or dead) and why it failed."""
    now = time.time() if now is None else now
    with ledger.begin() as conn:
        conn.execute(
            job_attempts.insert().values(
                batch_id=batch_id, attempt=attempt, outcome=outcome, cause=cause, bytes=bytes_, seconds=seconds, finished_at=now
            )
        )


def overview(ledger: Ledger, now: float | None = None) -> dict[str, Any]:
    """The status page's first screen: are deliveries arriving, are results landing."""
    now = time.time() if now is None else now
    with ledger.connect() as conn:
        states = job_counts(conn)
        windows = {}
        for name, seconds in (("hour", 3600), ("day", 86400)):
            rows = conn.execute(
                sa.select(deliveries.c.outcome, sa.func.count())
                .where(deliveries.c.received_at > now - seconds)
                .group_by(deliveries.c.outcome)
            ).all()
            windows[name] = {outcome: int(n) for outcome, n in rows}
        running = [
            dict(r)
            for r in conn.execute(
                sa.select(
                    jobs.c.batch_id,
                    jobs.c.attempts,
                    jobs.c.lease_owner,
                    jobs.c.updated_at,
                    jobs.c.planned_at,
                    jobs.c.bytes_so_far,
                )
                .where(jobs.c.state == RUNNING)
                .order_by(jobs.c.updated_at)
                .limit(50)
            ).mappings()
        ]
        oldest = _oldest_due(conn, now)
        last_stored = conn.execute(sa.select(sa.func.max(jobs.c.updated_at)).where(jobs.c.state == STORED)).scalar()
        last_delivery = conn.execute(sa.select(sa.func.max(deliveries.c.received_at))).scalar()
    return {
        "deliveries": windows,
        "jobs": states,
        "queue_depth": queue_depth(states),
        "oldest_queued_age": None if oldest is None else max(0.0, now - oldest),
        "running": running,
        "dead": states[DEAD],
        "last_stored_at": last_stored,
        "last_delivery_at": last_delivery,
    }


def find_jobs(ledger: Ledger, *, state: str | None = None, search: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Jobs newest first, optionally of one state and whose batch id contains `search`."""
    query = sa.select(jobs).order_by(jobs.c.updated_at.desc()).limit(limit)
    if state:
        query = query.where(jobs.c.state == state)
    if search:
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(jobs.c.batch_id.like(f"%{escaped}%", escape="\\"))
    with ledger.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def job_detail(ledger: Ledger, batch_id: str) -> dict[str, Any] | None:
    """One job with the deliveries that named its batch and its attempt history."""
    with ledger.connect() as conn:
        row = conn.execute(sa.select(jobs).where(jobs.c.batch_id == batch_id)).mappings().first()
        if row is None:
            return None
        events = [
            dict(r)
            for r in conn.execute(
                sa.select(deliveries.c.event_id, deliveries.c.event_type, deliveries.c.outcome, deliveries.c.received_at)
                .where(deliveries.c.batch_id == batch_id)
                .order_by(deliveries.c.received_at)
            ).mappings()
        ]
        attempts = [
            dict(r)
            for r in conn.execute(
                sa.select(job_attempts).where(job_attempts.c.batch_id == batch_id).order_by(job_attempts.c.id.desc()).limit(50)
            ).mappings()
        ]
    return {"job": dict(row), "events": events, "attempts": attempts}


def metric_figures(
    ledger: Ledger,
    now: float | None = None,
    duration_buckets: Sequence[float] = DURATION_BUCKETS,
    bytes_buckets: Sequence[float] = BYTES_BUCKETS,
) -> dict[str, Any]:
    """The figures behind the worker's metrics, summed over every worker that ever ran.

    Histograms are cumulative over the stored jobs (kept for ever), so they only grow, as a
    Prometheus histogram must; `rate()` over them works as over a process's own histogram.
    """
    now = time.time() if now is None else now
    duration = jobs.c.updated_at - jobs.c.planned_at
    stored = jobs.c.state == STORED
    with ledger.connect() as conn:
        oldest = _oldest_due(conn, now)
        last_stored = conn.execute(sa.select(sa.func.max(jobs.c.updated_at)).where(stored)).scalar()
        durations = _histogram(conn, duration, sa.and_(stored, jobs.c.planned_at.is_not(None)), duration_buckets)
        sizes = _histogram(conn, jobs.c.bytes, sa.and_(stored, jobs.c.bytes.is_not(None)), bytes_buckets)
        retries = conn.execute(
            sa.select(job_attempts.c.cause, sa.func.count())
            .where(job_attempts.c.outcome.in_((FAILED, DEAD)))
            .group_by(job_attempts.c.cause)
        ).all()
        downloaded = conn.execute(
            sa.select(
                sa.func.coalesce(sa.func.sum(job_attempts.c.bytes), 0), sa.func.coalesce(sa.func.sum(job_attempts.c.seconds), 0.0)
            ).where(job_attempts.c.outcome == STORED, job_attempts.c.bytes.is_not(None), job_attempts.c.seconds.is_not(None))
        ).one()
    return {
        "oldest_queued_age": 0.0 if oldest is None else max(0.0, now - oldest),
        "last_stored_at": last_stored or 0.0,
        "duration": durations,
        "bytes": sizes,
        "retries": {cause or "other": int(n) for cause, n in retries},
        "downloaded_bytes": int(downloaded[0]),
        "download_seconds": float(downloaded[1]),
    }


def _oldest_due(conn: sa.Connection, now: float) -> float | None:
    """When the longest-waiting due job became due: a job backing off before a retry is not late."""
    return conn.execute(
        sa.select(sa.func.min(jobs.c.next_attempt_at)).where(jobs.c.state.in_((QUEUED, FAILED)), jobs.c.next_attempt_at <= now)
    ).scalar()


def _histogram(conn: sa.Connection, value: Any, where: Any, buckets: Sequence[float]) -> dict[str, Any]:
    """Cumulative bucket counts, count and sum of `value` over the rows matching `where`, in one scan."""
    columns = [sa.func.count(), sa.func.coalesce(sa.func.sum(value), 0)]
    columns += [sa.func.coalesce(sa.func.sum(sa.case((value <= bound, 1), else_=0)), 0) for bound in buckets]
    row = conn.execute(sa.select(*columns).where(where)).one()
    count, total = int(row[0]), float(row[1])
    return {"buckets": [(bound, int(n)) for bound, n in zip(buckets, row[2:])], "count": count, "sum": total}

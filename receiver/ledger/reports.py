"""What the operator reads: the status page's queries and the figures `/metrics` derives from rows.

Kept apart from ledger.py (the write path the hook and the worker depend on): everything here is a
read, except :func:`record_attempt`, the one row the worker adds per finished attempt so that
retries, throughput and attempt history are counted for every worker on every host in one place.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from . import counters
from .ledger import Ledger, delivery_outcomes
from .schema import DEAD, FAILED, QUEUED, RUNNING, STORED, deliveries, job_attempts, jobs

#: Buckets of the job duration histogram (seconds from first claim to stored). The ledger's triggers
#: count into these (migration 0004): changing them needs a new revision.
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
    """The status page's first screen: are deliveries arriving, are results landing; with the
    polling fallback's and the notifications' figures, all in one read."""
    now = time.time() if now is None else now

    def read(conn: sa.Connection) -> dict[str, Any]:
        values = counters.read(conn)
        stats = ledger.read_stats(conn, values, now)
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
        return {
            "deliveries": {
                name: delivery_outcomes(conn, since=now - seconds) for name, seconds in (("hour", 3600), ("day", 86400))
            },
            "jobs": stats["jobs"],
            "queue_depth": stats["queue_depth"],
            "oldest_queued_age": _age(_oldest_due(conn, now), now),
            "running": running,
            "dead": stats["jobs"][DEAD],
            "last_stored_at": _last_stored(conn),
            "last_delivery_at": stats["last_delivery"]["received_at"] if stats["last_delivery"] else None,
            "notifications": stats["notifications"],
            "polling": ledger.read_polling_stats(conn, values, now),
        }

    return ledger.read(read, fold=True)


#: How many of the most recent jobs a search by part of a batch id looks through (an exact batch id
#: is found however old): a substring cannot use an index, so the search is bounded instead.
SEARCH_WINDOW = 20_000


def find_jobs(
    ledger: Ledger,
    *,
    state: str | None = None,
    search: str | None = None,
    limit: int = 100,
    before: tuple[float, str] | None = None,
    window: int = SEARCH_WINDOW,
) -> list[dict[str, Any]]:
    """Jobs newest first (by last change), optionally of one state and whose batch id contains
    `search`, one page at a time: `before` is the (updated_at, batch_id) of the last row of the
    previous page. Each page walks an index (ix_jobs_updated, ix_jobs_state_updated), so a page
    costs the same at a million jobs as at ten. A `search` looks through the `window` most
    recently changed jobs, and finds a whole batch id however old."""
    order = (jobs.c.updated_at.desc(), jobs.c.batch_id.desc())
    where = []
    if state:
        where.append(jobs.c.state == state)
    if before is not None:
        where.append(sa.tuple_(jobs.c.updated_at, jobs.c.batch_id) < sa.tuple_(sa.literal(before[0]), sa.literal(before[1])))
    query = sa.select(jobs).where(*where).order_by(*order).limit(limit)
    if search:
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        recent = sa.select(jobs).where(*where).order_by(*order).limit(window).subquery()
        matching = sa.select(recent).where(recent.c.batch_id.like(f"%{escaped}%", escape="\\"))
        exact = sa.select(jobs).where(jobs.c.batch_id == search, *where)
        found = sa.union(matching, exact).subquery()
        query = sa.select(found).order_by(found.c.updated_at.desc(), found.c.batch_id.desc()).limit(limit)
    return ledger.read(lambda conn: [dict(r) for r in conn.execute(query).mappings()])


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


def metric_figures(ledger: Ledger, now: float | None = None) -> dict[str, Any]:
    """The figures behind the worker's metrics, summed over every worker that ever ran."""
    now = time.time() if now is None else now
    return ledger.read(lambda conn: read_metric_figures(conn, counters.read(conn), now), fold=True)


def read_metric_figures(conn: sa.Connection, values: dict[str, float], now: float) -> dict[str, Any]:
    """metric_figures() over an open read (`values`: counters.read).

    The histograms and counters are kept by the ledger's triggers as jobs are stored and attempts
    finish (ledger/counters.py), so they only grow, as a Prometheus histogram must, and `rate()`
    over them works as over a process's own histogram, pruned rows or not.
    """
    retries = {name.partition(":")[2]: int(n) for name, n in values.items() if name.startswith("retries:")}
    return {
        "oldest_queued_age": _age(_oldest_due(conn, now), now) or 0.0,
        "last_stored_at": _last_stored(conn) or 0.0,
        "duration": counters.histogram(values, "duration", DURATION_BUCKETS),
        "bytes": counters.histogram(values, "bytes", BYTES_BUCKETS),
        "retries": retries,
        "downloaded_bytes": int(values.get("downloaded_bytes", 0)),
        "download_seconds": float(values.get("download_seconds", 0.0)),
    }


def scrape(ledger: Ledger, now: float | None = None) -> dict[str, Any]:
    """Everything `/metrics` shows from the ledger, in one read: `stats` (Ledger.stats with
    `polling`) and `figures` (metric_figures)."""
    now = time.time() if now is None else now

    def read(conn: sa.Connection) -> dict[str, Any]:
        values = counters.read(conn)
        stats = {**ledger.read_stats(conn, values, now), "polling": ledger.read_polling_stats(conn, values, now)}
        return {"stats": stats, "figures": read_metric_figures(conn, values, now)}

    return ledger.read(read, fold=True)


def _last_stored(conn: sa.Connection) -> float | None:
    """When the last batch was stored: the top of the (state, updated_at) index."""
    return conn.execute(
        sa.select(jobs.c.updated_at).where(jobs.c.state == STORED).order_by(jobs.c.updated_at.desc()).limit(1)
    ).scalar()


def _age(since: float | None, now: float) -> float | None:
    return None if since is None else max(0.0, now - since)


def _oldest_due(conn: sa.Connection, now: float) -> float | None:
    """When the longest-waiting due job became due: a job backing off before a retry is not late."""
    return conn.execute(
        sa.select(sa.func.min(jobs.c.next_attempt_at)).where(jobs.c.state.in_((QUEUED, FAILED)), jobs.c.next_attempt_at <= now)
    ).scalar()

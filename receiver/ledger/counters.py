"""The figures of history, read in O(1) however much history the ledger holds.

Jobs by state, stored bytes, the job duration and size histograms, retries by cause, bytes and
seconds downloaded, polls made, batches found by polling and notifications sent are rows of the
`counters` table. Triggers (migration 0004) change them in the transaction that changes the row they
count, so every writer counts, in every process, on every host, and a restart loses nothing.
Pruning old rows never lowers a figure: a Prometheus counter never goes down, and `jobs:stored`
counts the batches stored, not the rows still kept.

On SQLite a trigger adds to the counter's row directly: there is one writer at a time anyway. On
PostgreSQL it appends a row to `counter_deltas` instead, so that concurrent claims and commits never
wait on one hot row nor deadlock over two; :func:`read` folds the deltas into `counters` (one folder
at a time, under an advisory lock) and reads both in one statement, so a figure never appears to go
back while another reader folds.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .schema import counter_deltas, counters

#: pg_try_advisory_xact_lock key of the fold ("rcv-ctrs").
FOLD_LOCK = 0x7263762D63747273


def fold(conn: Connection) -> int:
    """Move PostgreSQL's pending deltas into `counters`, unless another process is doing it now;
    answers how many delta rows were folded. Call in a write transaction."""
    if conn.dialect.name != "postgresql":
        return 0
    if not conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(FOLD_LOCK))).scalar():
        return 0
    return int(
        conn.exec_driver_sql(
            "WITH moved AS (DELETE FROM counter_deltas RETURNING name, value), "
            "summed AS (SELECT name, SUM(value) AS value, COUNT(*) AS n FROM moved GROUP BY name), "
            "added AS (INSERT INTO counters (name, value) SELECT name, value FROM summed "
            "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value) "
            "SELECT COALESCE(SUM(n), 0) FROM summed"
        ).scalar_one()
    )


def read(conn: Connection) -> dict[str, float]:
    """Every counter's value (a name never counted is absent: read it with `.get(name, 0)`)."""
    both = sa.union_all(
        sa.select(counters.c.name, counters.c.value), sa.select(counter_deltas.c.name, counter_deltas.c.value)
    ).subquery()
    rows = conn.execute(sa.select(both.c.name, sa.func.sum(both.c.value)).group_by(both.c.name)).all()
    return {name: float(value) for name, value in rows}


def histogram(values: dict[str, float], prefix: str, bounds: tuple[float, ...]) -> dict[str, object]:
    """A histogram's cumulative buckets, count and sum, from its per-bucket counters."""
    running, buckets = 0, []
    for bound in bounds:
        running += int(values.get(f"{prefix}:le:{label(bound)}", 0))
        buckets.append((bound, running))
    return {"buckets": buckets, "count": int(values.get(f"{prefix}:count", 0)), "sum": values.get(f"{prefix}:sum", 0.0)}


def label(bound: float) -> str:
    """A bucket bound as the counters' names (and Prometheus's `le`) spell it: 60, not 60.0."""
    return str(int(bound)) if bound == int(bound) else str(bound)

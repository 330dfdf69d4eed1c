"""Claiming rows under a lease: the one statement jobs, polls and notifications are taken with.

A claim is a single UPDATE of the due rows picked by a subquery, returning what was taken. On
PostgreSQL the pick is ``FOR UPDATE SKIP LOCKED``, so workers on several machines claiming at the
same moment each take different rows instead of queueing behind one another; on SQLite every write
transaction takes the database's write lock up front (engine.py), which serialises claims. Either
way two claimants never hold the same row: correctness rests on the statement, not on a read
followed by a write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row


def claim_due(
    conn: Connection,
    table: sa.Table,
    *,
    due: Any,
    order_by: Any,
    values: dict[str, Any],
    returning: Sequence[Any],
    limit: int = 1,
) -> Sequence[Row[Any]]:
    """Set `values` (the lease) on up to `limit` rows of `table` matching `due`, taken in `order_by`
    order, and return their `returning` columns; an empty list when none is due. A composite
    primary key (a notification delivery: batch and target) is matched as a row value."""
    keys = list(table.primary_key.columns)
    pick = sa.select(*keys).where(due).order_by(order_by).limit(limit)
    if conn.dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True, of=table)
    taken = keys[0].in_(pick.scalar_subquery()) if len(keys) == 1 else sa.tuple_(*keys).in_(pick)
    return conn.execute(table.update().where(taken).values(**values).returning(*returning)).all()

"""Deliveries refused for their signature: counted per minute, never stored.

A receiver whose secret is wrong refuses every delivery with 401, and BatchRouter gives up after its
retry window; the count is what tells the operator (`receiver status`, /metrics) before batches are
missed. Only the count is kept, never a refused body: it is unauthenticated input. Old minutes are pruned
by retention (RECEIVER_REFUSED_RETENTION_DAYS, ledger/retention.py).
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .schema import refused_deliveries

#: At most one write a second per process for refused deliveries: a flood of bad signatures must
#: not become a flood of ledger writes competing with the good deliveries.
REFUSED_FLUSH_SECONDS = 1.0


class _Tally:
    """Refused deliveries counted in memory between two writes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending = 0
        self.written_at = 0.0


class RefusedDeliveries:
    """Mixed into :class:`~receiver.ledger.Ledger`: counting deliveries refused for their signature."""

    if TYPE_CHECKING:  # provided by Ledger

        def begin(self) -> AbstractContextManager[Connection]: ...
        def _insert(self, table: sa.Table) -> Any: ...

    def note_refused_delivery(self, *, now: float | None = None) -> None:
        """Count one delivery refused for its signature (never its body).

        Written at most once a second per process; counts arriving in between go with the next
        write (the first refusal after a quiet second is always written at once).
        """
        now = time.time() if now is None else now
        tally: _Tally = self.__dict__.setdefault("_refused_tally", _Tally())
        with tally.lock:
            tally.pending += 1
            if now - tally.written_at < REFUSED_FLUSH_SECONDS:
                return
            count, tally.pending, tally.written_at = tally.pending, 0, now
        minute = int(now // 60)
        with self.begin() as conn:
            conn.execute(
                self._insert(refused_deliveries)
                .values(minute=minute, count=count)
                .on_conflict_do_update(index_elements=["minute"], set_={"count": refused_deliveries.c.count + count})
            )


def refused_last_day(conn: Connection, now: float) -> int:
    """Deliveries refused for their signature in the last 24 hours."""
    return int(
        conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(refused_deliveries.c.count), 0)).where(
                refused_deliveries.c.minute > int((now - 86400) // 60)
            )
        ).scalar_one()
    )

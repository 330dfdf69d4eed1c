"""Housekeeping: the worker's periodic clean-up, on a schedule of its own, off the claim thread.

Each round removes partial uploads an interrupted attempt left behind (older than any live attempt
could be) and prunes delivery records past `RECEIVER_DELIVERY_RETENTION_DAYS`. It is a duty like the
heartbeat and the poller, so a slow storage listing never delays a claim, and a new clean-up step
(retention of stored results, say) is one more line in :meth:`Housekeeping.tick`.
"""

from __future__ import annotations

import logging

from ..config import Settings
from ..errors import ReceiverError
from ..ledger import Ledger
from ..storage import Storage
from .duty import Duty

log = logging.getLogger(__name__)

#: Seconds between rounds: the clean-up is cheap but lists storage, and nothing in it is urgent.
HOUSEKEEPING_SECONDS = 300.0


class Housekeeping(Duty):
    """Remove abandoned partial uploads and prune old delivery records, every few minutes."""

    name = "housekeeping"

    def __init__(self, settings: Settings, ledger: Ledger, storage: Storage, *, interval: float = HOUSEKEEPING_SECONDS) -> None:
        super().__init__(interval)
        self.settings = settings
        self.ledger = ledger
        self.storage = storage

    @property
    def partials_age_seconds(self) -> float:
        """A partial upload older than this belongs to no live attempt: even a slow one renews its
        lease and reads within these bounds."""
        return max(600.0, 4 * self.settings.lease_seconds + 2 * self.settings.read_timeout_seconds)

    def tick(self) -> bool:
        try:
            removed = self.storage.cleanup_partials(older_than_seconds=self.partials_age_seconds)
            if removed:
                log.info("removed %d abandoned partial uploads", removed)
            days = self.settings.delivery_retention_days
            pruned = self.ledger.prune_deliveries(days)
            if pruned:
                log.info("pruned %d delivery records older than %d days", pruned, days)
        except ReceiverError as exc:
            log.warning("housekeeping skipped: %s", exc)
        return False

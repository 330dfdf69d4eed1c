"""Housekeeping: the worker's periodic clean-up, on a schedule of its own, off the claim thread.

Each round removes partial uploads an interrupted attempt left behind (older than any live attempt
could be), folds PostgreSQL's counter deltas into the counters, and prunes what every ledger table
keeps past its retention (receiver/ledger/retention.py).
Both cost what is in flight or due, never the history: local storage lists its `.partial/` folder
and S3 its unfinished uploads, and the ledger is pruned in steps of a few thousand rows through an
index, with a pause after each step as long as the step took, so ingest and claims take the ledger
in between. It is a duty like the heartbeat and the poller: a slow storage listing or a backlog of a
year of rows never delays a claim, and SIGTERM stops it between two steps.
"""

from __future__ import annotations

import logging

from ..config import Settings
from ..errors import ReceiverError
from ..ledger import Ledger
from ..ledger.retention import STEP_ROWS
from ..storage import Storage
from .duty import Duty

log = logging.getLogger(__name__)

#: Seconds between rounds: nothing in it is urgent, and a backlog is worked off within a round.
HOUSEKEEPING_SECONDS = 300.0

#: The shortest pause between two prune steps; a slower step is followed by a pause as long as it.
MIN_STEP_PAUSE_SECONDS = 0.05


class Housekeeping(Duty):
    """Remove abandoned partial uploads and prune what is past its retention, every few minutes."""

    name = "housekeeping"

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        storage: Storage,
        *,
        interval: float = HOUSEKEEPING_SECONDS,
        step_rows: int = STEP_ROWS,
    ) -> None:
        super().__init__(interval)
        self.settings = settings
        self.ledger = ledger
        self.storage = storage
        self.policy = settings.retention
        self.step_rows = step_rows

    @property
    def partials_age_seconds(self) -> float:
        """A partial upload older than this belongs to no live attempt: even a slow one renews its
        lease and reads within these bounds."""
        return max(600.0, 4 * self.settings.worker.lease_seconds + 2 * self.settings.worker.read_timeout_seconds)

    def tick(self) -> bool:
        try:
            removed = self.storage.cleanup_partials(older_than_seconds=self.partials_age_seconds)
            if removed:
                log.info("removed %d abandoned partial uploads", removed)
        except ReceiverError as exc:
            log.warning("housekeeping: partial uploads not cleaned: %s", exc)
        # A ledger nobody scrapes would otherwise pile up PostgreSQL's counter deltas until the next
        # read folds them all at once (reads fold too; this keeps each fold one round's worth).
        self.ledger.fold_counters()
        self.prune()
        return False

    def prune(self) -> dict[str, int]:
        """Prune every table past its retention, step by step, until done or stopped; rows
        removed by rule (logged)."""
        removed = {name: n for name, n in self.ledger.prune(self.policy, limit=self.step_rows, pause=self._pause).items() if n}
        if removed:
            log.info("pruned past retention: %s", ", ".join(f"{n:,} {name}" for name, n in removed.items()))
        return removed

    def _pause(self, step_seconds: float) -> bool:
        """Between two prune steps: as long as the step took (at least MIN_STEP_PAUSE_SECONDS), so
        the prune takes at most half the ledger's time; none after an empty step. False once the
        worker stops."""
        wait = max(MIN_STEP_PAUSE_SECONDS, step_seconds) if step_seconds else 0.0
        return not self.stopping.wait(wait)

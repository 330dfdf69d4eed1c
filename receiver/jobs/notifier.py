"""The notifier: deliver each outbox event to one target until the target has it.

One notifier per configured target (webhook, SQS, EventBridge) runs as one of every worker
process's duties (see duty.py). Deliveries are claimed from the ledger under a lease, so many workers attempt each one one
at a time; a transient failure (see :mod:`receiver.jobs.senders`) is retried with capped backoff and
jitter until the delivery's retry window (at least 24 h) ends, across restarts, and then marked
failed (`receiver status`, /metrics); a rejected event is marked failed at once. Each target has its
own rows, so one that is down never holds another back.
"""

from __future__ import annotations

import logging
import time

from ..config import WEBHOOK, Settings
from ..errors import NotifyError, NotifyRejected
from ..ledger import Ledger
from ..retry import backoff
from .duty import Duty
from .senders import Sender, open_sender

log = logging.getLogger(__name__)

#: Longest wait a consumer's Retry-After may ask for; the window still ends the retries.
MAX_RETRY_AFTER_SECONDS = 3600.0


class Notifier(Duty):
    """Claims a target's due deliveries from the ledger and hands them to its sender, one per round."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        owner: str,
        target: str = WEBHOOK,
        *,
        sender: Sender | None = None,
        idle_seconds: float = 1.0,
    ) -> None:
        super().__init__(idle_seconds)
        self.settings = settings
        self.ledger = ledger
        self.owner = owner
        self.sender = sender if sender is not None else open_sender(target, settings)
        self.target = self.sender.target
        self.name = f"notifier-{self.target}"
        # A claim outlives the longest attempt, so no second sender takes an event still in flight.
        self.lease_seconds = self.sender.timeout_seconds + settings.worker.lease_seconds

    def started(self) -> None:
        log.info("notifier %s sending batch.stored events to %s", self.owner, self.target)

    def finished(self) -> None:
        self.sender.close()

    def tick(self) -> bool:
        return self.send_one()

    def send_one(self, now: float | None = None) -> bool:
        """Claim one due delivery and make one attempt at it; False when none was due."""
        event = self.ledger.claim_notification(self.owner, self.lease_seconds, now, target=self.target)
        if event is None:
            return False
        try:
            self.sender.send(event)
        except NotifyError as exc:
            self._failed(event.batch_id, event.webhook_id, event.attempts, event.retry_from, exc)
            return True
        self.ledger.notification_sent(event.batch_id, self.owner, target=self.target)
        log.info("batch %s announced to %s (%s, attempt %d)", event.batch_id, self.target, event.webhook_id, event.attempts)
        return True

    def _failed(self, batch_id: str, webhook_id: str, attempts: int, retry_from: float, exc: NotifyError) -> None:
        """Pending again after a backoff (or the target's retry-after), or failed for good when the
        event was rejected or the next attempt would fall after the retry window."""
        error = str(exc)
        delay = exc.retry_after
        if delay is None:
            delay = backoff(attempts, base=self.settings.worker.retry_base_seconds, cap=self.settings.worker.retry_cap_seconds)
        retry_at = time.time() + min(delay, MAX_RETRY_AFTER_SECONDS)
        if isinstance(exc, NotifyRejected) or retry_at >= retry_from + self.settings.notify.retry_seconds:
            self.ledger.notification_failed(batch_id, self.owner, error, retry_at=None, target=self.target)
            log.error(
                "batch %s: %s notification %s failed for good after %d attempts: %s",
                batch_id,
                self.target,
                webhook_id,
                attempts,
                error,
            )
        else:
            self.ledger.notification_failed(batch_id, self.owner, error, retry_at=retry_at, target=self.target)
            log.warning(
                "batch %s: %s notification attempt %d failed, retry in %.1fs: %s",
                batch_id,
                self.target,
                attempts,
                retry_at - time.time(),
                error,
            )

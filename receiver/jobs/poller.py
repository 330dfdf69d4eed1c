"""The polling fallback: ask BatchRouter about known batches no terminal delivery has settled.

BatchRouter stops retrying a delivery after its retry window; a receiver that was down longer, or
refused deliveries with a wrong secret, would never learn that a batch ended. So each worker runs a
poller (one of its duties, see duty.py): it claims due polls through the ledger (shared work: each batch is polled about once
per `RECEIVER_POLL_SECONDS` however many workers run), asks `GET /v1/batches/{id}`, and when the
batch has ended queues its one job exactly as a terminal delivery would have.

Polite by design: the next poll of a batch is drawn over half to one and a half intervals, so polls
spread out instead of arriving in bursts; a 429 pauses polling for its `Retry-After`; 5xx and
network errors back off exponentially, capped at the interval; a 404 stops polling that batch.
"""

from __future__ import annotations

import logging
import random
import time

from ..batchrouter import BatchRouterClient
from ..config import Settings
from ..errors import APIError, BatchNotFound, LedgerUnavailable, RateLimited
from ..ledger import ENDED, NOT_FOUND, Ledger
from .duty import Duty

log = logging.getLogger(__name__)

#: Seconds the poller's client waits to connect, and for each read: one attempt per poll.
POLL_TIMEOUT_SECONDS = 10.0
#: Polls claimed at once, and how long they stay ours: a poller that dies gives them up after it.
#: The lease is never renewed, so it is sized for a whole round: CLAIM_LIMIT polls of one request
#: each, bounded by POLL_TIMEOUT_SECONDS (the first that fails gives the rest back). A round slower
#: still costs a second GET of a batch, nothing more: a poll is recorded only by its owner. No
#: setting governs this: RECEIVER_LEASE_SECONDS is a job's lease, which the heartbeat renews, and
#: RECEIVER_POLL_SECONDS says when a batch is due again, not how long a round of polls may take.
CLAIM_LIMIT = 10
CLAIM_LEASE_SECONDS = 180.0
#: Every so often the poller stops watching batches a delivery queued (see Ledger.end_known_with_jobs).
HOUSEKEEPING_SECONDS = 60.0


class Poller(Duty):
    """Claims due polls from the ledger and asks BatchRouter about each batch."""

    name = "poller"

    def __init__(self, ledger: Ledger, client: BatchRouterClient, *, poll_seconds: float, owner: str) -> None:
        # How often the ledger is asked for due polls: often enough that an overdue poll is made
        # within a second or two, rarely enough to cost nothing (a read that finds none due).
        super().__init__(min(2.0, max(0.2, poll_seconds / 4)))
        self.ledger = ledger
        self.client = client
        self.poll_seconds = poll_seconds
        self.owner = owner
        self._failures = 0
        self._housekeeping_due = 0.0

    @classmethod
    def from_settings(cls, settings: Settings, ledger: Ledger, owner: str) -> Poller | None:
        """The worker's poller; None when polling is off (`RECEIVER_POLL_SECONDS=0`)."""
        if not settings.worker.poll_seconds:
            return None
        # One attempt per request: the poller paces itself (429, backoff) instead of blocking in retries.
        client = BatchRouterClient(settings.api_url, settings.require_api_key(), timeout=POLL_TIMEOUT_SECONDS, retries=1)
        return cls(ledger, client, poll_seconds=settings.worker.poll_seconds, owner=owner)

    def started(self) -> None:
        log.info("polling known batches every %ds (RECEIVER_POLL_SECONDS)", self.poll_seconds)

    def finished(self) -> None:
        self.client.close()

    def tick(self) -> bool:
        if time.monotonic() >= self._housekeeping_due:
            self.ledger.end_known_with_jobs()
            self._housekeeping_due = time.monotonic() + HOUSEKEEPING_SECONDS
        claimed = self.ledger.claim_polls(
            self.owner, interval=self.poll_seconds, limit=CLAIM_LIMIT, lease_seconds=CLAIM_LEASE_SECONDS
        )
        if not claimed:
            return False
        self._poll_all(claimed)
        return True

    def _poll_all(self, claimed: list[str]) -> None:
        for i, batch_id in enumerate(claimed):
            pause = None if self.stopping.is_set() else self._poll_guarded(batch_id)
            if self.stopping.is_set() or pause:
                # Give the rest back: due at once for the next worker, or after the pause.
                rest = claimed[i + 1 :] if pause else claimed[i:]
                try:
                    self.ledger.release_polls(rest, self.owner, now=time.time() + (pause or 0.0))
                except LedgerUnavailable as exc:
                    log.error("cannot give back polls (taken again once their lease ends): %s", exc)
                if pause:
                    self.stopping.wait(pause)
                return

    def _poll_guarded(self, batch_id: str) -> float | None:
        try:
            return self.poll(batch_id)
        except LedgerUnavailable as exc:
            log.error("poll of batch %s not recorded: %s", batch_id, exc)
            return self.interval
        except Exception:  # a bug must not stop polling for good
            log.exception("poll of batch %s failed", batch_id)
            return self.interval

    def poll(self, batch_id: str) -> float | None:
        """Poll one batch and record the answer; returns how long to pause all polling, if at all."""
        try:
            batch = self.client.get_batch(batch_id)
        except BatchNotFound:
            self.ledger.record_poll(batch_id, self.owner, status="404 not found", state=NOT_FOUND)
            log.warning("batch %s: BatchRouter does not know it (404); polling it stopped", batch_id)
            return None
        except RateLimited as exc:
            delay = exc.retry_after if exc.retry_after is not None else self._backoff()
            self._again(batch_id, f"429 rate limited: {exc}", delay)
            log.warning("polling paused for %.1fs: BatchRouter rate-limits us (429)", delay)
            return delay
        except APIError as exc:  # 5xx, a timeout, a dropped connection; or a key BatchRouter refuses
            delay = self._backoff()
            self._again(batch_id, f"{type(exc).__name__}: {exc}", delay)
            log.warning("polling paused for %.1fs after batch %s: %s", delay, batch_id, exc)
            return delay
        self._failures = 0
        if not batch.terminal:
            self._again(batch_id, batch.status, self.poll_seconds * random.uniform(0.5, 1.5))
            return None
        if self.ledger.record_poll(batch_id, self.owner, status=batch.status, state=ENDED):
            log.warning("batch %s (%s): stored by polling: no terminal delivery arrived", batch_id, batch.status)
        else:
            log.info("batch %s (%s): ended, and its job was already queued", batch_id, batch.status)
        return None

    def _again(self, batch_id: str, status: str, delay: float) -> None:
        self.ledger.record_poll(batch_id, self.owner, status=status, next_poll_at=time.time() + delay)

    def _backoff(self) -> float:
        self._failures += 1
        return min(float(self.poll_seconds), 2.0 ** min(self._failures - 1, 16)) * random.uniform(0.8, 1.2)

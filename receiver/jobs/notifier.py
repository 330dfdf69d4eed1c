"""The notification sender: POST each outbox event, signed the Standard Webhooks way, until a 2xx.

It runs as one of every worker process's duties (see duty.py). Events are claimed from the ledger under a lease, so
many workers send each event one at a time; an attempt that fails (any non-2xx, a refused or dropped
connection, a timeout) is retried with capped backoff and jitter until the event's retry window (at
least 24 h) ends, across restarts, and then marked failed (`receiver status`, /metrics).

The URL is the operator's own service, so the artifact SSRF rules do not apply (config checks it is
https unless on loopback or RECEIVER_NOTIFY_HOSTS); the BatchRouter API key never goes there.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time

import urllib3

from .. import __version__
from ..config import Settings
from ..ledger import Ledger, Notification
from ..retry import backoff, parse_retry_after
from .duty import Duty

log = logging.getLogger(__name__)

#: Longest wait a consumer's Retry-After may ask for; the window still ends the retries.
MAX_RETRY_AFTER_SECONDS = 3600.0


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed with the decoded whsec_ secret
    (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Notifier(Duty):
    """Claims due events from the ledger and POSTs them to `settings.notify_url`, one per round."""

    name = "notifier"

    def __init__(self, settings: Settings, ledger: Ledger, owner: str, *, idle_seconds: float = 1.0) -> None:
        if settings.notify_url is None or settings.notify_secret is None:
            raise ValueError("the notifier needs RECEIVER_NOTIFY_URL and RECEIVER_NOTIFY_SECRET")
        super().__init__(idle_seconds)
        self.settings = settings
        self.ledger = ledger
        self.owner = owner
        self._timeout = urllib3.Timeout(connect=settings.connect_timeout_seconds, read=min(30.0, settings.read_timeout_seconds))
        # A claim outlives the longest attempt, so no second sender takes an event still in flight.
        self.lease_seconds = settings.connect_timeout_seconds + min(30.0, settings.read_timeout_seconds) + settings.lease_seconds
        self._http = urllib3.PoolManager(retries=False, timeout=self._timeout)

    def started(self) -> None:
        log.info("notifier %s sending batch.stored events", self.owner)

    def finished(self) -> None:
        self._http.clear()

    def tick(self) -> bool:
        return self.send_one()

    def send_one(self, now: float | None = None) -> bool:
        """Claim one due event and make one attempt at it; False when none was due."""
        event = self.ledger.claim_notification(self.owner, self.lease_seconds, now=now)
        if event is None:
            return False
        error, retry_after = self._post(event)
        if error is None:
            self.ledger.notification_sent(event.batch_id, self.owner)
            log.info("batch %s announced (%s, attempt %d)", event.batch_id, event.webhook_id, event.attempts)
            return True
        delay = retry_after
        if delay is None:
            delay = backoff(event.attempts, base=self.settings.retry_base_seconds, cap=self.settings.retry_cap_seconds)
        retry_at = time.time() + min(delay, MAX_RETRY_AFTER_SECONDS)
        if retry_at >= event.retry_from + self.settings.notify_retry_seconds:
            self.ledger.notification_failed(event.batch_id, self.owner, error, retry_at=None)
            log.error(
                "batch %s: notification %s failed for good after %d attempts: %s",
                event.batch_id,
                event.webhook_id,
                event.attempts,
                error,
            )
        else:
            self.ledger.notification_failed(event.batch_id, self.owner, error, retry_at=retry_at)
            log.warning(
                "batch %s: notification attempt %d failed, retry in %.1fs: %s",
                event.batch_id,
                event.attempts,
                retry_at - time.time(),
                error,
            )
        return True

    def _post(self, event: Notification) -> tuple[str | None, float | None]:
        """One POST; (None, None) on a 2xx, else (what went wrong, the consumer's Retry-After)."""
        assert self.settings.notify_url is not None and self.settings.notify_secret is not None
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": f"batchrouter-receiver/{__version__}",
            "webhook-id": event.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.settings.notify_secret, event.webhook_id, timestamp, event.body),
        }
        try:
            response = self._http.request(
                "POST", self.settings.notify_url, body=event.body, headers=headers, redirect=False, preload_content=True
            )
        except urllib3.exceptions.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500], None
        if 200 <= response.status < 300:
            return None, None
        return f"HTTP {response.status}", parse_retry_after(response.headers.get("retry-after"))

"""The Standard Webhooks sender: POST the event to RECEIVER_NOTIFY_URL, signed, until a 2xx.

The URL is the operator's own service, so the artifact SSRF rules do not apply (config checks it is
https unless on loopback or RECEIVER_NOTIFY_HOSTS); the BatchRouter API key never goes there. Any
non-2xx answer is transient: a consumer that is deploying answers 404 or 502 for a while.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import TYPE_CHECKING

import urllib3

from ... import __version__
from ...config import WEBHOOK
from ...errors import NotifyTransient
from ...retry import parse_retry_after

if TYPE_CHECKING:
    from ...config import Settings
    from ...ledger import Notification


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed with the decoded whsec_ secret
    (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSender:
    """POSTs events to one URL with the `webhook-id`, `webhook-timestamp` and `webhook-signature` headers."""

    target = WEBHOOK

    def __init__(self, url: str, secret: str, *, connect_timeout: float, read_timeout: float) -> None:
        self.url = url
        self._secret = secret
        self.timeout_seconds = connect_timeout + read_timeout
        self._http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout))

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookSender:
        if settings.notify.url is None or settings.notify.secret is None:
            raise ValueError("the webhook sender needs RECEIVER_NOTIFY_URL and RECEIVER_NOTIFY_SECRET")
        return cls(
            settings.notify.url,
            settings.notify.secret,
            connect_timeout=settings.worker.connect_timeout_seconds,
            read_timeout=min(30.0, settings.worker.read_timeout_seconds),
        )

    def send(self, event: Notification) -> None:
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": f"batchrouter-receiver/{__version__}",
            "webhook-id": event.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._secret, event.webhook_id, timestamp, event.body),
        }
        try:
            response = self._http.request(
                "POST", self.url, body=event.body, headers=headers, redirect=False, preload_content=True
            )
        except urllib3.exceptions.HTTPError as exc:
            raise NotifyTransient(f"{type(exc).__name__}: {exc}"[:500]) from None
        if not 200 <= response.status < 300:
            raise NotifyTransient(f"HTTP {response.status}", parse_retry_after(response.headers.get("retry-after")))

    def close(self) -> None:
        self._http.clear()

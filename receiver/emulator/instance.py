"""One emulator instance: its configuration, state, deliverer and the key that signs artifact URLs.

The blueprints share one :class:`Emulator` per app and reach it through :func:`emulator`, so none of
them imports the app module that registers them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import secrets
import time
from typing import Any
from urllib.parse import quote

from flask import current_app, request

from .delivery import DEFAULT_RETRY_DELAYS, Deliverer
from .responses import batch_counts
from .state import TERMINAL_STATUSES, Batch, State, WebhookTarget, utcnow

DEFAULT_API_KEY = "br_test_emulator"


@dataclasses.dataclass
class EmulatorConfig:
    """How one emulator instance behaves. Port 0 picks a free port (`server.start_in_thread`)."""

    host: str = "127.0.0.1"
    port: int = 8081
    api_key: str = DEFAULT_API_KEY
    #: Initial delivery target, as if `PUT /v1/auth/account/delivery-webhook` had been called.
    webhook_url: str | None = None
    webhook_secret: str | None = None
    #: Base of the signed artifact URLs; None serves them under the URL the client used for the API.
    artifact_base_url: str | None = None
    url_ttl_seconds: int = 300
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    allow_insecure_webhooks: bool = False
    allow_private_webhooks: bool = False
    #: CA bundle to verify the delivery target's TLS certificate (e.g. Caddy's internal CA).
    ca_file: str | None = None


class Emulator:
    """The state and helpers shared by the blueprints; one per app."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        webhook = None
        if config.webhook_url and config.webhook_secret:
            webhook = WebhookTarget(config.webhook_url, config.webhook_secret, utcnow())
        self.state = State(webhook)
        self.deliverer = Deliverer(self.state.record_delivery, config.retry_delays, ca_file=config.ca_file)
        # A fresh random key per instance: a guessed or forged artifact URL never validates.
        self._url_key = secrets.token_bytes(32)

    # --- signed artifact URLs ---------------------------------------------------------------------

    def _url_signature(self, batch_id: str, name: str, expires: int) -> str:
        message = f"{batch_id}\n{name}\n{expires}".encode()
        return hmac.new(self._url_key, message, hashlib.sha256).hexdigest()

    def signed_url(self, batch_id: str, name: str) -> tuple[str, dt.datetime]:
        expires = int(time.time()) + self.config.url_ttl_seconds
        base = (self.config.artifact_base_url or request.host_url).rstrip("/")
        sig = self._url_signature(batch_id, name, expires)
        path = f"/artifacts/{quote(batch_id, safe='')}/{quote(name)}"
        expires_at = dt.datetime.fromtimestamp(expires, dt.UTC)
        return f"{base}{path}?expires={expires}&sig={sig}", expires_at

    def check_url(self, batch_id: str, name: str) -> str | None:
        """Why the current request's signed URL is refused, or None when it is valid."""
        try:
            expires = int(request.args.get("expires", ""))
        except ValueError:
            return "SignatureDoesNotMatch"
        expected = self._url_signature(batch_id, name, expires)
        if not hmac.compare_digest(expected, request.args.get("sig", "")):
            return "SignatureDoesNotMatch"
        if time.time() > expires:
            return "Request has expired"
        return None

    # --- deliveries -------------------------------------------------------------------------------

    def event_body(self, batch: Batch, form: str, event_id: str | None, event_type: str | None) -> dict[str, Any]:
        """A delivery for `batch` in its current status, in one of the two documented forms."""
        status = batch.spelled_status()
        if event_type is None:
            terminal = batch.status in TERMINAL_STATUSES
            event_type = f"batch.{status}" if terminal else "batch.progress"
        output_url = error_url = None
        if batch.status == "completed":
            output_url = self.signed_url(batch.id, batch.results.name)[0]
            if batch.errors is not None:
                error_url = self.signed_url(batch.id, batch.errors.name)[0]
        if form == "flat":
            return {
                "event": event_type,
                "batch_id": batch.id,
                "output_file_url": output_url,
                "error_file_url": error_url,
            }
        counts = batch_counts(batch)
        return {
            "id": event_id or "evt_" + secrets.token_hex(12),
            "type": event_type,
            "created": int(time.time()),
            "data": {
                "batch_id": batch.id,
                "status": status,
                "items_total": counts["total"],
                "items_completed": counts["completed"],
                "items_failed": counts["failed"],
                "cost_usd": "2.4137",
                "output_file_url": output_url,
            },
        }


def emulator() -> Emulator:
    """The current app's emulator: how the blueprints reach it without importing the app."""
    emu: Emulator = current_app.extensions["emulator"]
    return emu

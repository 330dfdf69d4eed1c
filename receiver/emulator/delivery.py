"""Signed webhook deliveries, sent and retried the way BatchRouter does.

BatchRouter POSTs the JSON body with `X-BatchRouter-Signature`, the lowercase hex HMAC-SHA256 of the
exact body bytes keyed by the secret's UTF-8 (docs.batchrouter.com/guides/webhooks/). Its retry
policy is not in the current docs; the older docs say 8 tries over 24 h with exponential backoff and
a 10 s acknowledgement window (test.batchrouter.com/docs/webhooks), so any non-2xx answer, timeout
or connection error is retried here on a (much shorter, configurable) schedule.

urllib3 rather than requests: it is a runtime dependency of the package, and unlike requests it
does not pick up proxy settings from the environment, so a delivery to localhost stays local.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

import urllib3

from ..signature import HEADER, sign
from .state import rfc3339, utcnow

#: Seconds BatchRouter waits for an answer before it counts the attempt as failed.
ACK_TIMEOUT = 10.0
DEFAULT_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 60.0)

Recorder = Callable[[dict[str, Any]], None]


class Deliverer:
    """Sends deliveries on background threads and reports every attempt to `record`."""

    def __init__(
        self,
        record: Recorder,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        ca_file: str | None = None,
        timeout: float = ACK_TIMEOUT,
    ) -> None:
        self._record = record
        self._retry_delays = tuple(retry_delays)
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        # Redirects are not followed and urllib3's own retries are off: every attempt is ours.
        self._http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=ca_file, retries=False, num_pools=20)
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    def send(
        self,
        url: str,
        secret: str,
        body: bytes,
        *,
        batch_id: str | None = None,
        event_id: str | None = None,
        copies: int = 1,
        wait: bool = False,
    ) -> list[str]:
        """Start `copies` identical deliveries at once; return their delivery ids.

        With `wait`, return only once each has succeeded or run out of retries.
        """
        with self._lock:
            cancelled = self._cancelled
        headers = {"Content-Type": "application/json", HEADER: sign(secret, body)}
        threads = []
        ids = []
        for _ in range(max(1, copies)):
            delivery_id = "dlv_" + secrets.token_hex(8)
            ids.append(delivery_id)
            meta = {
                "delivery_id": delivery_id,
                "batch_id": batch_id,
                "event_id": event_id,
                "url": url,
            }
            thread = threading.Thread(
                target=self._run,
                args=(url, headers, body, meta, cancelled),
                name=f"emulator-{delivery_id}",
                daemon=True,
            )
            thread.start()
            threads.append(thread)
        if wait:
            for thread in threads:
                thread.join()
        return ids

    def cancel_pending(self) -> None:
        """Stop the retries of every delivery started so far (after a reset, or at shutdown)."""
        with self._lock:
            self._cancelled.set()
            self._cancelled = threading.Event()

    def _run(
        self,
        url: str,
        headers: dict[str, str],
        body: bytes,
        meta: dict[str, Any],
        cancelled: threading.Event,
    ) -> None:
        delays = (0.0, *self._retry_delays)
        for attempt, delay in enumerate(delays, start=1):
            if delay and cancelled.wait(delay):
                return
            status, error = self._attempt(url, headers, body)
            ok = status is not None and 200 <= status < 300
            final = ok or attempt == len(delays)
            self._record(
                {
                    **meta,
                    "attempt": attempt,
                    "status": status,
                    "error": error,
                    "ok": ok,
                    "final": final,
                    "at": rfc3339(utcnow()),
                }
            )
            if ok:
                return

    def _attempt(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int | None, str | None]:
        try:
            response = self._http.request("POST", url, body=body, headers=headers, timeout=self._timeout, redirect=False)
        except Exception as exc:  # no answer at all is a failed attempt too, as for BatchRouter
            return None, f"{type(exc).__name__}: {exc}"
        return response.status, None

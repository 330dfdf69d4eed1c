"""Everything the emulator remembers, in memory, behind one lock.

The server is threaded (every request on its own thread, deliveries on theirs), so each read or
write of shared data goes through a method of :class:`State` that holds the lock. Nothing slow
(generating or hashing an artifact, sending a delivery) happens while the lock is held.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import threading
import time
from collections import Counter
from typing import Any

from .content import AnyArtifact

ACTIVE_STATUSES = ("pending", "queued", "routing", "dispatched", "processing", "completing")
TERMINAL_STATUSES = ("completed", "failed", "cancelled", "expired")
SHAPES = ("plain", "wrapped", "state")
URL_KEYS = ("url", "download_url", "artifact_url", "signed_url")
CANCEL_SPELLINGS = ("cancelled", "canceled")
#: How `GET /v1/batches/{id}/results` answers: JSON pages, or the whole file as raw JSONL (the form
#: of the older SDK; docs/batchrouter-api.md, "Sources and how far we trust them").
RESULTS_FORMS = ("json", "jsonl")

FAULT_TARGETS = ("artifact", "api")
FAULT_KINDS = ("drop", "429", "500", "503", "expired", "stall", "truncate")
#: Faults that let the response start and then break its body.
BODY_FAULTS = ("drop", "truncate", "stall")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def rfc3339(moment: dt.datetime) -> str:
    text = moment.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


@dataclasses.dataclass
class Batch:
    """One batch and the files it will have. `status` is kept spelled `cancelled`."""

    id: str
    status: str
    items: int
    line_bytes: int
    error_items: int
    results: AnyArtifact
    errors: AnyArtifact | None
    gzip: bool = False
    ranges: bool = True
    shape: str = "plain"
    url_key: str = "url"
    cancel_spelling: str = "cancelled"
    #: False: artifact-url answers 404 and the results are only to be paged
    #: (docs/batchrouter-api.md, "Results pages").
    artifact_url: bool = True
    results_form: str = "json"
    created_at: dt.datetime = dataclasses.field(default_factory=utcnow)

    def spelled_status(self) -> str:
        return self.cancel_spelling if self.status == "cancelled" else self.status

    def artifact(self, name: str) -> AnyArtifact | None:
        """The file served under `name`, or None when this batch has no such file."""
        for candidate in (self.results, self.errors):
            if candidate is not None and candidate.name == name:
                return candidate
        return None


@dataclasses.dataclass
class Fault:
    """A queued failure; each matching request consumes one of `remaining`."""

    id: int
    target: str
    kind: str
    batch_id: str | None = None
    remaining: int = 1
    after_bytes: int = 0
    retry_after: int | None = None
    stall_seconds: float = 5.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class WebhookTarget:
    url: str
    secret: str
    updated_at: dt.datetime


class State:
    """Batches, faults, counters, delivery records and the delivery target."""

    def __init__(self, webhook: WebhookTarget | None = None) -> None:
        self._lock = threading.Lock()
        self._batches: dict[str, Batch] = {}
        self._faults: list[Fault] = []
        self._fault_ids = itertools.count(1)
        self._artifact_requests: Counter[str] = Counter()
        self._artifact_requests_with_authorization = 0
        self._api_requests: Counter[str] = Counter()
        self._stalls_in_progress = 0
        self._deliveries: list[dict[str, Any]] = []
        self._webhook = webhook

    # --- batches ----------------------------------------------------------------------------------

    def add_batch(self, batch: Batch) -> bool:
        """Store `batch`; False when its id is taken."""
        with self._lock:
            if batch.id in self._batches:
                return False
            self._batches[batch.id] = batch
            return True

    def get_batch(self, batch_id: str) -> Batch | None:
        with self._lock:
            return self._batches.get(batch_id)

    def set_status(self, batch_id: str, status: str) -> Batch | None:
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is not None:
                batch.status = status
            return batch

    # --- faults -----------------------------------------------------------------------------------

    def add_fault(self, **fields: Any) -> Fault:
        with self._lock:
            fault = Fault(id=next(self._fault_ids), **fields)
            self._faults.append(fault)
            return fault

    def faults(self) -> list[dict[str, Any]]:
        with self._lock:
            return [f.to_dict() for f in self._faults]

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def take_fault(self, target: str, batch_id: str | None) -> Fault | None:
        """Consume the oldest fault for `target` that matches `batch_id` (or any batch)."""
        with self._lock:
            for fault in self._faults:
                if fault.target == target and fault.batch_id in (None, batch_id):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return dataclasses.replace(fault)
            return None

    # --- counters and records ---------------------------------------------------------------------

    def count_artifact_request(self, batch_id: str, with_authorization: bool) -> None:
        with self._lock:
            self._artifact_requests[batch_id] += 1
            if with_authorization:
                self._artifact_requests_with_authorization += 1

    def count_api_request(self, path: str) -> None:
        with self._lock:
            self._api_requests[path] += 1

    def stall(self, seconds: float) -> None:
        """Sleep through a `stall` fault, counted in `stalls_in_progress` meanwhile: a test can tell
        that a client gave up (or was stopped) before the stall ended, without a clock."""
        with self._lock:
            self._stalls_in_progress += 1
        try:
            time.sleep(seconds)
        finally:
            with self._lock:
                self._stalls_in_progress -= 1

    def record_delivery(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._deliveries.append(dict(record))

    def deliveries(self, delivery_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._deliveries if delivery_id is None or r["delivery_id"] == delivery_id]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "artifact_requests": dict(self._artifact_requests),
                "artifact_requests_with_authorization": self._artifact_requests_with_authorization,
                "api_requests": dict(self._api_requests),
                "stalls_in_progress": self._stalls_in_progress,
                "deliveries": [dict(r) for r in self._deliveries],
            }

    def reset(self) -> None:
        """Forget batches, faults and counters; the delivery target stays."""
        with self._lock:
            self._batches.clear()
            self._faults.clear()
            self._artifact_requests.clear()
            self._artifact_requests_with_authorization = 0
            self._api_requests.clear()
            self._deliveries.clear()

    # --- delivery target --------------------------------------------------------------------------

    @property
    def webhook(self) -> WebhookTarget | None:
        with self._lock:
            return self._webhook

    def set_webhook(self, url: str, secret: str) -> WebhookTarget:
        with self._lock:
            self._webhook = WebhookTarget(url=url, secret=secret, updated_at=utcnow())
            return self._webhook

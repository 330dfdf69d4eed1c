"""The EventBridge sender: `PutEvents` of one entry to RECEIVER_NOTIFY_EVENT_BUS.

The entry's `Source` is `batchrouter-receiver`, its `DetailType` `batch.stored` and its `Detail` the
event JSON, so a rule matches `{"source": ["batchrouter-receiver"], "detail-type": ["batch.stored"]}`
and targets read the manifest at `$.detail.data`. PutEvents answers 200 even when an entry failed
(`FailedEntryCount`, the entry's `ErrorCode`): such an entry is retried like a throttled call
(https://docs.aws.amazon.com/eventbridge/latest/APIReference/API_PutEvents.html).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...config import EVENTBRIDGE
from ...ledger.outbox import EVENT_TYPE
from .aws import classify, client, region_of_arn, translate

if TYPE_CHECKING:
    from ...config import Settings
    from ...ledger import Notification

#: The events' `source`: what a rule's event pattern matches on.
SOURCE = "batchrouter-receiver"


class EventBridgeSender:
    """Puts each event on one bus."""

    target = EVENTBRIDGE

    def __init__(self, bus: str, *, timeout: float = 10.0, events: Any = None) -> None:
        self.bus = bus
        self.timeout_seconds = 2 * timeout
        self._timeout = timeout
        self._client = events
        self._fix = f"create the bus or fix RECEIVER_NOTIFY_EVENT_BUS, and allow events:PutEvents on it ({bus})"

    @classmethod
    def from_settings(cls, settings: Settings) -> EventBridgeSender:
        if settings.notify.event_bus is None:
            raise ValueError("the EventBridge sender needs RECEIVER_NOTIFY_EVENT_BUS")
        return cls(settings.notify.event_bus, timeout=settings.worker.connect_timeout_seconds)

    def entry(self, event: Notification) -> dict[str, Any]:
        """The PutEvents entry of one event."""
        return {"EventBusName": self.bus, "Source": SOURCE, "DetailType": EVENT_TYPE, "Detail": event.body.decode()}

    def send(self, event: Notification) -> None:
        if self._client is None:  # created on first use, on the notifier's thread
            self._client = client("events", region_of_arn(self.bus), timeout=self._timeout)
        try:
            answer = self._client.put_events(Entries=[self.entry(event)])
        except Exception as exc:  # noqa: BLE001 - translate() re-raises what is not boto's
            raise translate(exc, f"EventBridge bus {self.bus}", self._fix) from None
        if answer.get("FailedEntryCount"):
            failed: dict[str, Any] = next((e for e in answer.get("Entries", []) if e.get("ErrorCode")), {})
            code = str(failed.get("ErrorCode", "FailedEntry"))
            raise classify(code, str(failed.get("ErrorMessage", "")), f"EventBridge bus {self.bus}", self._fix)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

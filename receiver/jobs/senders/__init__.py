"""Where a `batch.stored` event goes: one small interface, one module per target.

A sender makes one attempt at one event and either returns (the target has it) or raises
:class:`~receiver.errors.NotifyTransient` (try again later, with the target's retry-after when it
gave one) or :class:`~receiver.errors.NotifyRejected` (this event will never be accepted as it is).
The outbox, the leases, the backoff and the retry window are the notifier's; a sender knows only its
target's protocol:

- `webhook.py`: a POST signed the Standard Webhooks way (RECEIVER_NOTIFY_URL);
- `sqs.py`: `SendMessage` to a standard or FIFO queue (RECEIVER_NOTIFY_SQS_URL);
- `eventbridge.py`: `PutEvents` to a bus (RECEIVER_NOTIFY_EVENT_BUS);
- `aws.py`: the boto3 clients and the mapping of their errors onto transient / rejected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ...config import EVENTBRIDGE, SQS, WEBHOOK

if TYPE_CHECKING:
    from ...config import Settings
    from ...ledger import Notification


class Sender(Protocol):
    """One notification target."""

    #: The ledger's name of the target (`webhook`, `sqs`, `eventbridge`).
    target: str
    #: Longest one attempt can take, so a claim's lease outlives it.
    timeout_seconds: float

    def send(self, event: Notification) -> None:
        """Hand `event` to the target once; raise NotifyTransient or NotifyRejected if it did not take it."""

    def close(self) -> None:
        """Release connections."""


def open_sender(target: str, settings: Settings) -> Sender:
    """The sender of a configured target."""
    if target == WEBHOOK:
        from .webhook import WebhookSender

        return WebhookSender.from_settings(settings)
    if target == SQS:
        from .sqs import SQSSender

        return SQSSender.from_settings(settings)
    if target == EVENTBRIDGE:
        from .eventbridge import EventBridgeSender

        return EventBridgeSender.from_settings(settings)
    raise ValueError(f"unknown notification target {target!r}")


__all__ = ["Sender", "open_sender"]

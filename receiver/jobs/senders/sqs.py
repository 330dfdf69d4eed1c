"""The SQS sender: the event JSON as one message on RECEIVER_NOTIFY_SQS_URL.

A FIFO queue (its name ends in `.fifo`) gets the event id as `MessageDeduplicationId`, so SQS drops
a resend within its 5-minute deduplication interval, and the batch id as `MessageGroupId`. Every
message, FIFO or standard, carries the event id as the `webhook-id` message attribute: a standard
queue delivers at least once and consumers deduplicate on it
(https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_SendMessage.html).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from ...config import SQS
from .aws import client, region_of_queue, translate

if TYPE_CHECKING:
    from ...config import Settings
    from ...ledger import Notification

#: SQS's limit on MessageGroupId and MessageDeduplicationId.
MAX_ID_LENGTH = 128


class SQSSender:
    """Sends each event as one message to one queue."""

    target = SQS

    def __init__(self, queue_url: str, *, timeout: float = 10.0, sqs: Any = None) -> None:
        self.queue_url = queue_url
        self.fifo = queue_url.rstrip("/").endswith(".fifo")
        self.timeout_seconds = 2 * timeout
        self._timeout = timeout
        self._client = sqs
        self._fix = f"create the queue or fix RECEIVER_NOTIFY_SQS_URL, and allow sqs:SendMessage on it ({queue_url})"

    @classmethod
    def from_settings(cls, settings: Settings) -> SQSSender:
        if settings.notify.sqs_url is None:
            raise ValueError("the SQS sender needs RECEIVER_NOTIFY_SQS_URL")
        return cls(settings.notify.sqs_url, timeout=settings.worker.connect_timeout_seconds)

    def message(self, event: Notification) -> dict[str, Any]:
        """The SendMessage parameters of one event."""
        params: dict[str, Any] = {
            "QueueUrl": self.queue_url,
            "MessageBody": event.body.decode(),
            "MessageAttributes": {"webhook-id": {"DataType": "String", "StringValue": event.webhook_id}},
        }
        if self.fifo:
            params["MessageDeduplicationId"] = event.webhook_id
            params["MessageGroupId"] = _fifo_id(event.batch_id)
        return params

    def send(self, event: Notification) -> None:
        if self._client is None:  # created on first use, on the notifier's thread
            self._client = client("sqs", region_of_queue(self.queue_url), timeout=self._timeout)
        try:
            self._client.send_message(**self.message(event))
        except Exception as exc:  # noqa: BLE001 - translate() re-raises what is not boto's
            raise translate(exc, f"SQS queue {self.queue_url}", self._fix) from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _fifo_id(value: str) -> str:
    """A FIFO id within SQS's 128 characters: the value itself when it fits, else its hash."""
    return value if len(value) <= MAX_ID_LENGTH else hashlib.sha256(value.encode()).hexdigest()

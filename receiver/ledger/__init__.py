"""The ledger: deliveries, jobs under leases, webhook secrets, known batches and the outbox. The web
side and the job side meet only here."""

from .ledger import Ledger
from .schema import (
    DEAD,
    ENDED,
    FAILED,
    JOB_STATES,
    NOT_FOUND,
    QUEUED,
    RUNNING,
    STORED,
    WATCHING,
    Delivery,
    Job,
    Notification,
    RecordResult,
    SecretInfo,
)

__all__ = [
    "DEAD",
    "ENDED",
    "FAILED",
    "JOB_STATES",
    "NOT_FOUND",
    "QUEUED",
    "RUNNING",
    "STORED",
    "WATCHING",
    "Delivery",
    "Job",
    "Ledger",
    "Notification",
    "RecordResult",
    "SecretInfo",
]

"""The ledger: deliveries, jobs under leases, and webhook secrets. The web side and the job side
meet only here."""

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
    RecordResult,
    SecretInfo,
)

__all__ = [
    "DEAD",
    "ENDED",
    "FAILED",
    "NOT_FOUND",
    "WATCHING",
    "JOB_STATES",
    "QUEUED",
    "RUNNING",
    "STORED",
    "Delivery",
    "Job",
    "Ledger",
    "RecordResult",
    "SecretInfo",
]

"""The ledger: deliveries, jobs under leases, and webhook secrets. The web side and the job side
meet only here."""

from .ledger import Ledger
from .schema import DEAD, FAILED, JOB_STATES, QUEUED, RUNNING, STORED, Job, Notification, RecordResult, SecretInfo

__all__ = [
    "DEAD",
    "FAILED",
    "JOB_STATES",
    "QUEUED",
    "RUNNING",
    "STORED",
    "Job",
    "Ledger",
    "Notification",
    "RecordResult",
    "SecretInfo",
]

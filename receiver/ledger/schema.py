"""The ledger's tables, job states, and the small records its API returns.

Correctness rests on these constraints, never on check-then-insert: a delivery is unique by event
id, a batch has one job row (so it is stored once however many deliveries come).

The schema is versioned by the Alembic revisions in migrations/versions/: a change here needs a
revision there (tests/test_migrations.py fails until the two agree). README, "Scaling out".
"""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa

#: Job states. `failed` waits for its next attempt; `dead` waits for an operator (`receiver fetch`).
QUEUED, RUNNING, FAILED, STORED, DEAD = "queued", "running", "failed", "stored", "dead"
JOB_STATES = (QUEUED, RUNNING, FAILED, STORED, DEAD)

metadata = sa.MetaData()

#: Release 0.1.0's version marker, still 1: its processes refuse a ledger whose number is higher.
schema_info = sa.Table(
    "schema_info",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("event_id", sa.String(255), primary_key=True),
    sa.Column("batch_id", sa.String(255), nullable=True, index=True),
    sa.Column("event_type", sa.String(255), nullable=False),
    sa.Column("status", sa.String(255), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False, index=True),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("batch_id", sa.String(255), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("lease_owner", sa.String(255), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("origin", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    #: Chosen once, at the first attempt, so a retry on another day overwrites the same keys.
    sa.Column("planned_at", sa.Float, nullable=True),
    sa.Column("stored_at", sa.Float, nullable=True),
    sa.Column("batch_status", sa.String(64), nullable=True),
    sa.Column("manifest_key", sa.String(1024), nullable=True),
    sa.Column("bytes", sa.BigInteger, nullable=True),
    sa.Column("lines", sa.BigInteger, nullable=True),
    sa.Column("expected_items", sa.BigInteger, nullable=True),
    sa.Column("counts_match", sa.Boolean, nullable=True),
    sa.Index("ix_jobs_due", "state", "next_attempt_at"),
)

secrets = sa.Table(
    "webhook_secrets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("secret", sa.String(512), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    #: NULL while current; set on rotation to the end of the grace period.
    sa.Column("expires_at", sa.Float, nullable=True),
)


@dataclasses.dataclass(frozen=True)
class Job:
    batch_id: str
    state: str
    attempts: int
    lease_owner: str | None
    planned_at: float | None
    origin: str


@dataclasses.dataclass(frozen=True)
class RecordResult:
    """What ingest answers: `accepted`, `duplicate` or `ignored`, and whether a job was queued."""

    outcome: str
    job_queued: bool


@dataclasses.dataclass(frozen=True)
class SecretInfo:
    id: int
    created_at: float
    expires_at: float | None

"""The ledger's tables, job states, and the small records its API returns.

Correctness rests on these constraints, never on check-then-insert: a delivery is unique by event
id, a batch has one job row (so it is stored once however many deliveries come).

The schema is versioned by the Alembic revisions in migrations/versions/: a change here needs a
revision there (tests/test_migrations.py fails until the two agree). README, "Scaling out".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

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
    #: Bytes the running attempt has stored so far, renewed with its lease (the status page).
    sa.Column("bytes_so_far", sa.BigInteger, nullable=True),
    sa.Index("ix_jobs_due", "state", "next_attempt_at"),
    #: The status page's job list and `receiver ls`, newest first, page by page.
    sa.Index("ix_jobs_updated", "updated_at", "batch_id"),
    #: The same for one state (dead jobs, running jobs) and the last stored batch.
    sa.Index("ix_jobs_state_updated", "state", "updated_at", "batch_id"),
)

#: Delivery states, per target: `pending` until the target accepts the event (or its retry window
#: ends: `failed`), then `sent`.
PENDING, SENT = "pending", "sent"
NOTIFICATION_STATES = (PENDING, SENT, FAILED)

#: The outbox: one `batch.stored` event per batch, written in the transaction that marks the job
#: stored, so no stored batch goes unannounced (docs/architecture.md, "Invariants"). The event is
#: kept once; where it goes is `notification_deliveries`.
notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("batch_id", sa.String(255), primary_key=True),
    #: Standard Webhooks `webhook-id`, the SQS deduplication id and attribute, the EventBridge
    #: entry's resource: chosen once, the same on every attempt, target and replay.
    sa.Column("webhook_id", sa.String(64), nullable=False, unique=True),
    #: The event JSON, the same bytes for every target (and what the webhook signs).
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    #: Retention: events past the job retention (the rows go) ...
    sa.Index("ix_notifications_created", "created_at"),
    #: ... and events that still hold a body (an emptied body leaves this index, so dropping
    #: bodies never rescans the ones already dropped).
    sa.Index(
        "ix_notifications_body_kept",
        "created_at",
        sqlite_where=sa.text("length(body) > 0"),
        postgresql_where=sa.text("length(body) > 0"),
    ),
)

#: Each target's delivery of an event (`webhook`, `sqs`, `eventbridge`), claimed under a lease and
#: retried on its own: a slow or broken target never holds another one back.
notification_deliveries = sa.Table(
    "notification_deliveries",
    metadata,
    sa.Column("batch_id", sa.String(255), primary_key=True),
    sa.Column("target", sa.String(16), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    #: When the delivery was queued or last replayed: retries end (`failed`) a window after it.
    sa.Column("retry_from", sa.Float, nullable=False),
    sa.Column("lease_owner", sa.String(255), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("sent_at", sa.Float, nullable=True),
    sa.Index("ix_notification_deliveries_due", "target", "state", "next_attempt_at"),
    #: Retention finds settled deliveries past the job retention through it.
    sa.Index("ix_notification_deliveries_retry_from", "retry_from"),
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

#: One row per finished attempt (stored, retry or dead), written by the worker through
#: metrics.attempt_finished: the retries-by-cause counter, download throughput and the status page
#: read it, so every worker process on every host is counted without scraping each one.
job_attempts = sa.Table(
    "job_attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("batch_id", sa.String(255), nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    #: stored, failed (a retry follows) or dead.
    sa.Column("outcome", sa.String(16), nullable=False),
    #: Why it failed: rate_limit, server_error, network, expired_url, storage, not_terminal, other.
    sa.Column("cause", sa.String(32), nullable=True),
    sa.Column("bytes", sa.BigInteger, nullable=True),
    sa.Column("seconds", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=False, index=True),
)


#: Known-batch states (the polling fallback): `watching` is polled until BatchRouter says it ended
#: (`ended`, its job queued) or does not know it (`not_found`, polling stops).
WATCHING, ENDED, NOT_FOUND = "watching", "ended", "not_found"

known_batches = sa.Table(
    "known_batches",
    metadata,
    sa.Column("batch_id", sa.String(255), primary_key=True),
    #: `delivery` (a signed delivery named it) or `watch` (`receiver watch`).
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("first_seen_at", sa.Float, nullable=False),
    #: NULL until the first poll: due at first_seen_at + RECEIVER_POLL_SECONDS (the ingest path
    #: does not know the interval). While a poll is in hand, the end of its lease.
    sa.Column("next_poll_at", sa.Float, nullable=True),
    sa.Column("poll_owner", sa.String(255), nullable=True),
    sa.Column("polls", sa.Integer, nullable=False, default=0),
    sa.Column("last_polled_at", sa.Float, nullable=True),
    #: BatchRouter's status at the last poll, or the error that poll met.
    sa.Column("last_status", sa.String(255), nullable=True),
    #: True when a poll (not a delivery) queued the batch's job: its terminal delivery was lost.
    sa.Column("found_by_poll", sa.Boolean, nullable=False, default=False),
    sa.Index("ix_known_batches_due", "state", "next_poll_at"),
    #: Retention finds ended and not-found batches past their time through it.
    sa.Index("ix_known_batches_state_seen", "state", "first_seen_at"),
)

#: Deliveries refused for a bad signature, counted per minute (never their bodies): a wrong secret
#: is the usual way deliveries are lost, and `receiver status` shows the last 24 hours.
refused_deliveries = sa.Table(
    "refused_deliveries",
    metadata,
    sa.Column("minute", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("count", sa.Integer, nullable=False),
)


#: Figures of history (jobs by state, stored bytes, the job histograms, retries by cause, polls,
#: notifications sent), kept up to date by triggers on the tables whose rows they count, in the
#: transaction that changes the row (receiver/ledger/counters.py). A figure is the sum of its rows.
counters = sa.Table(
    "counters",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
)

#: PostgreSQL's triggers append a row here instead of updating `counters`, so that concurrent
#: writers never wait on (or deadlock over) one hot row; reading folds them into `counters`.
counter_deltas = sa.Table(
    "counter_deltas",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("value", sa.Float, nullable=False),
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
class Delivery:
    """A verified, validated delivery: what the hook hands the ledger to record."""

    event_id: str
    event_type: str
    batch_id: str | None
    status: str | None
    terminal: bool


class DeliveryRow(NamedTuple):
    """One row of the deliveries table, fields in column order (the multi-row INSERT's parameters)."""

    event_id: str
    batch_id: str | None
    event_type: str
    status: str | None
    outcome: str
    received_at: float


@dataclasses.dataclass(frozen=True)
class Notification:
    """One target's delivery of an outbox event, claimed for sending."""

    batch_id: str
    target: str
    webhook_id: str
    body: bytes
    attempts: int
    retry_from: float


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


def insert_deliveries(insert: Callable[[sa.Table], Any], rows: Any) -> Any:
    """The one delivery insert: `rows` (one mapping, or a list for several rows) ON CONFLICT
    (event_id) DO NOTHING, returning the event ids inserted (RETURNING, not rowcount: drivers
    disagree on rowcount for ON CONFLICT). `insert` is the dialect's (sqlite or postgresql) insert.
    The ledger, and both group commits, record deliveries with it."""
    return insert(deliveries).values(rows).on_conflict_do_nothing(index_elements=["event_id"]).returning(deliveries.c.event_id)

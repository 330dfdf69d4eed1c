"""The tables of the polling fallback, the notification outbox and the per-attempt job figures.

All four are new tables: nothing already in a ledger changes. known_batches and refused_deliveries
serve the polling fallback (a batch named by any signed delivery, or watched, is polled until it
ends; refused signatures are counted per minute); notifications is the outbox of `batch.stored`
events, written with `mark_stored`; job_attempts is one row per finished attempt, read by /metrics
and the status page.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "known_batches",
        sa.Column("batch_id", sa.String(255), primary_key=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("first_seen_at", sa.Float, nullable=False),
        sa.Column("next_poll_at", sa.Float, nullable=True),
        sa.Column("poll_owner", sa.String(255), nullable=True),
        sa.Column("polls", sa.Integer, nullable=False),
        sa.Column("last_polled_at", sa.Float, nullable=True),
        sa.Column("last_status", sa.String(255), nullable=True),
        sa.Column("found_by_poll", sa.Boolean, nullable=False),
        sa.Index("ix_known_batches_due", "state", "next_poll_at"),
    )
    op.create_table(
        "refused_deliveries",
        sa.Column("minute", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("count", sa.Integer, nullable=False),
    )
    op.create_table(
        "notifications",
        sa.Column("batch_id", sa.String(255), primary_key=True),
        sa.Column("webhook_id", sa.String(64), nullable=False, unique=True),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("retry_from", sa.Float, nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", sa.Float, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("sent_at", sa.Float, nullable=True),
        sa.Index("ix_notifications_due", "state", "next_attempt_at"),
    )
    op.create_table(
        "job_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("batch_id", sa.String(255), nullable=False, index=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("cause", sa.String(32), nullable=True),
        sa.Column("bytes", sa.BigInteger, nullable=True),
        sa.Column("seconds", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=False, index=True),
    )


def downgrade() -> None:
    for table in ("job_attempts", "notifications", "refused_deliveries", "known_batches"):
        op.drop_table(table)

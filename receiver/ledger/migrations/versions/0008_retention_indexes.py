"""Indexes that retention's small deletes walk, so pruning costs what it removes, not the history.

Known batches by state and age (stored jobs by age use 0004's ix_jobs_state_updated), events by
age (every row, and the rows that still hold a body: a partial index, so that dropping bodies never
rescans the emptied ones) and their deliveries by retry_from. See receiver/ledger/retention.py.

After 0006 (the notification targets, which rebuild the notifications table) and 0007.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_HOLDS_BODY = sa.text("length(body) > 0")


def upgrade() -> None:
    op.create_index("ix_known_batches_state_seen", "known_batches", ["state", "first_seen_at"])
    op.create_index("ix_notifications_created", "notifications", ["created_at"])
    op.create_index("ix_notification_deliveries_retry_from", "notification_deliveries", ["retry_from"])
    op.create_index(
        "ix_notifications_body_kept",
        "notifications",
        ["created_at"],
        sqlite_where=_HOLDS_BODY,
        postgresql_where=_HOLDS_BODY,
    )


def downgrade() -> None:
    op.drop_index("ix_notifications_body_kept", table_name="notifications")
    op.drop_index("ix_notification_deliveries_retry_from", table_name="notification_deliveries")
    op.drop_index("ix_notifications_created", table_name="notifications")
    op.drop_index("ix_known_batches_state_seen", table_name="known_batches")

"""Notification targets: each target's delivery of an outbox event is tracked on its own.

The event stays one row in `notifications` (its webhook-id and body); the state, attempts, lease and
retry window move to `notification_deliveries`, one row per (batch, target). Every existing row
becomes the `webhook` target's delivery with its state, attempts and errors, so a pending event is
still sent, with the same webhook-id, after the upgrade.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None

#: The columns that move from notifications to notification_deliveries.
_MOVED = ("state", "attempts", "next_attempt_at", "retry_from", "lease_owner", "lease_expires_at", "last_error", "sent_at")


def upgrade() -> None:
    op.create_table(
        "notification_deliveries",
        sa.Column("batch_id", sa.String(255), primary_key=True),
        sa.Column("target", sa.String(16), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("retry_from", sa.Float, nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", sa.Float, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("sent_at", sa.Float, nullable=True),
        sa.Index("ix_notification_deliveries_due", "target", "state", "next_attempt_at"),
    )
    columns = ", ".join(_MOVED)
    op.execute(
        f"INSERT INTO notification_deliveries (batch_id, target, {columns}) "
        f"SELECT batch_id, 'webhook', {columns} FROM notifications"
    )
    op.drop_index("ix_notifications_due", table_name="notifications")
    with op.batch_alter_table("notifications") as batch:
        for column in _MOVED:
            batch.drop_column(column)


def downgrade() -> None:
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=False, server_default="pending"))
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("next_attempt_at", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("retry_from", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("lease_owner", sa.String(255), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("last_error", sa.Text, nullable=True))
        batch.add_column(sa.Column("sent_at", sa.Float, nullable=True))
    # The webhook target's delivery goes back into the event's row; other targets' are dropped.
    for column in _MOVED:
        op.execute(
            f"UPDATE notifications SET {column} = (SELECT d.{column} FROM notification_deliveries d "
            f"WHERE d.batch_id = notifications.batch_id AND d.target = 'webhook') "
            f"WHERE EXISTS (SELECT 1 FROM notification_deliveries d "
            f"WHERE d.batch_id = notifications.batch_id AND d.target = 'webhook')"
        )
    op.create_index("ix_notifications_due", "notifications", ["state", "next_attempt_at"])
    op.drop_table("notification_deliveries")

"""The schema of release 0.1.0, the last one without migrations (schema_info version 1).

Frozen: written out here rather than taken from schema.py, so that it stays what 0.1.0 created
while schema.py moves on. A ledger 0.1.0 created is stamped with this revision, not re-created.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema_info = op.create_table(
        "schema_info",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.bulk_insert(schema_info, [{"id": 1, "version": 1}])
    op.create_table(
        "deliveries",
        sa.Column("event_id", sa.String(255), primary_key=True),
        sa.Column("batch_id", sa.String(255), nullable=True, index=True),
        sa.Column("event_type", sa.String(255), nullable=False),
        sa.Column("status", sa.String(255), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("received_at", sa.Float, nullable=False, index=True),
    )
    op.create_table(
        "jobs",
        sa.Column("batch_id", sa.String(255), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", sa.Float, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
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
    op.create_table(
        "webhook_secrets",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("secret", sa.String(512), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
    )


def downgrade() -> None:
    for table in ("webhook_secrets", "jobs", "deliveries", "schema_info"):
        op.drop_table(table)

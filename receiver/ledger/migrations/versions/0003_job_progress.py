"""jobs.bytes_so_far: how far a running attempt has come, for the status page.

The worker's lease heartbeat writes it (every lease/3 seconds), so an operator sees a long download
move without the worker serving anything of its own.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("bytes_so_far", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("bytes_so_far")

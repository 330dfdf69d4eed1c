"""Alembic's entry point, run by receiver/ledger/migrate.py on a connection it already holds.

That connection is inside a transaction under the migration lock (a PostgreSQL advisory lock, or
SQLite's write lock), so every revision and the version stamp commit together or not at all.
"""

from __future__ import annotations

from alembic import context

from receiver.ledger.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite alters a table by copying it; batch mode makes op.batch_alter_table do that for us.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()

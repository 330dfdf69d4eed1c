"""Alembic migration scripts of the ledger (configured in code by receiver/ledger/migrate.py)."""

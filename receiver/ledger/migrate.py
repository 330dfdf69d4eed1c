"""Bringing the ledger's schema up to date: Alembic, configured in code, run under a lock.

Every process calls :func:`upgrade` when it starts (through ``Ledger.create_schema``), so many
processes starting together on one database must be safe: the one that takes the lock migrates, the
others wait and then find the schema current. The lock is PostgreSQL's advisory lock, or SQLite's
write lock (the engine begins every write transaction with ``BEGIN IMMEDIATE``). Both end with the
transaction, which also holds the migration itself: a migration commits whole or not at all.

A ledger written by release 0.1.0 (tables and ``schema_info`` but no ``alembic_version``) is the
schema of revision 0001; it is stamped so, then upgraded.
"""

from __future__ import annotations

from functools import cache

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection, Engine

from ..errors import LedgerError, SchemaOutdated
from .engine import READ_ONLY

#: The revision that is the schema of release 0.1.0 (schema_info version 1, no version table).
ADOPTED_REVISION = "0001"
#: pg_advisory_xact_lock key shared by every process that migrates this ledger.
LOCK_KEY = 727274


@cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "receiver.ledger:migrations")
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision this release knows."""
    found = _script().get_current_head()
    assert found is not None
    return found


def current(conn: Connection) -> str | None:
    """The ledger's revision: 0001 for an unstamped 0.1.0 ledger, None for an empty database."""
    return _adopted(conn, _stamped(conn))


def upgrade(engine: Engine, *, auto: bool = True) -> str | None:
    """Bring the schema to head; returns the revision it started from.

    With ``auto=False`` an older schema raises :class:`SchemaOutdated` and nothing is written.
    A schema newer than this release (a later release migrated it) raises :class:`LedgerError`.
    """
    with engine.connect().execution_options(**{READ_ONLY: True}) as conn:
        # The usual case, every start of every process: already current, and no lock taken.
        stamped = _stamped(conn)
        found = _check(_adopted(conn, stamped), auto)
        conn.rollback()
    if stamped == head() or not auto:
        return found
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        # Under the lock: another process may have migrated while we waited for it.
        stamped = _stamped(conn)
        found = _check(_adopted(conn, stamped), auto)
        config = _config(conn)
        if stamped is None and found == ADOPTED_REVISION:
            command.stamp(config, ADOPTED_REVISION)
        if found != head():
            command.upgrade(config, "head")
    return found


def _stamped(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _adopted(conn: Connection, stamped: str | None) -> str | None:
    """`stamped`, or 0001 for a ledger 0.1.0 created (read after `stamped`, never before: a
    process that migrates meanwhile makes both newer, never the version older than the tables)."""
    if stamped is None and sa.inspect(conn).has_table("schema_info"):
        return ADOPTED_REVISION
    return stamped


def _check(found: str | None, auto: bool) -> str | None:
    if found is not None and found != head():
        try:
            _script().get_revision(found)
        except CommandError:
            raise LedgerError(
                f"the ledger's schema is at revision {found}, newer than this receiver knows ({head()}); upgrade the receiver"
            ) from None
    if found != head() and not auto:
        raise SchemaOutdated(
            f"the ledger's schema is at revision {found or 'none (empty database)'}, this receiver needs {head()}; "
            "run `receiver db upgrade` (RECEIVER_AUTO_MIGRATE is false)"
        )
    return found

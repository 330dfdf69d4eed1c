"""Engine creation for the ledger: SQLite (WAL, one file, write lock up front) or PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DisconnectionError, OperationalError

from ..config import POSTGRES_DRIVER_MISSING
from ..errors import UnsupportedDatabase

#: Execution option marking a connection that only reads (Ledger.connect).
READ_ONLY = "receiver_read_only"


def create_engine(url: str, busy_timeout_seconds: float, *, pooled: bool = True) -> Engine:
    """The ledger's engine; `pooled=False` (SQLite only) opens a connection per use, for reads run
    on native threads under gevent, where the pool's (gevent) locks must not be taken."""
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path and path != ":memory:":
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
        pool: dict[str, Any] = (
            {"pool_size": 8, "max_overflow": 24, "pool_timeout": busy_timeout_seconds}
            if pooled
            else {"poolclass": sa.pool.NullPool}
        )
        engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_seconds, "check_same_thread": False}, **pool)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            sqlite_pragmas(dbapi_conn, busy_timeout_seconds)

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock up front, so contention waits (busy_timeout) instead
            # of failing half-way through a transaction. Reads need no lock (WAL) and take none.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    if url.startswith(("postgresql", "postgres")):
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://") :]
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise UnsupportedDatabase("DATABASE_URL", POSTGRES_DRIVER_MISSING) from None
        # A fixed pool: under gevent a web process may have hundreds of requests in flight, and
        # overflow connections (opened and closed per checkout, a PostgreSQL backend forked each
        # time) cost more than waiting for one of 16 (bench_ingest --database-url: 394/s -> 521/s).
        return sa.create_engine(url, pool_size=16, max_overflow=0, pool_pre_ping=True)
    raise UnsupportedDatabase("DATABASE_URL", "use sqlite:///path.db or postgresql://…")


def connection_lost(exc: BaseException, dialect: str) -> bool:
    """Whether `exc` means the connection itself is gone (a restart, a failover, a terminated
    backend) rather than a statement failing: the pool replaces such connections, so the call may
    simply be made again.

    SQLAlchemy marks a broken connection it saw (`connection_invalidated`) and raises
    `DisconnectionError` (`InvalidatePoolError`) when pre-ping finds one; on PostgreSQL every
    OperationalError is one of connection refused, "the database system is shutting down",
    "terminating connection due to administrator command" or "server closed the connection"
    (SQLSTATE classes 08 and 57), which a restart produces. SQLite has no connection to lose: its
    OperationalError (a lock held past the busy timeout, a full disk) stays a plain outage.
    """
    if isinstance(exc, DisconnectionError) or getattr(exc, "connection_invalidated", False):
        return True
    return dialect == "postgresql" and isinstance(exc, OperationalError)


def describe(exc: BaseException) -> str:
    """The driver's message without the SQL and parameters (which may include a secret)."""
    return (str(getattr(exc, "orig", exc)).splitlines() or [repr(exc)])[0][:300]


def sqlite_path(url: str) -> str | None:
    """The file of an `sqlite:///path` URL (or ":memory:"), None for any other database."""
    return url.split(":///", 1)[1] if url.startswith("sqlite") else None


def sqlite_pragmas(dbapi_conn: sqlite3.Connection, busy_timeout_seconds: float) -> None:
    """The settings every SQLite connection of the ledger runs with, pooled or the committer's."""
    # We issue BEGIN ourselves: pysqlite's implicit transactions would start deferred and fail with
    # "database is locked" when two writers upgrade at once.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a 200 is sent only after the delivery survives a power cut, not just a crash.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_seconds * 1000)}")
    cur.close()

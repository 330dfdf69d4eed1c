"""The group commit: a process's concurrent deliveries recorded in one transaction, one fsync.

The SQLite half goes through sqlite3 directly and takes turns on a lock file; the PostgreSQL half
uses the ledger's pooled engine. Both share the leader/follower hand-off in `GroupCommit`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from ..cooperative import BlockingRunner, ready_first, run_in_place
from ..errors import LedgerUnavailable
from .engine import describe, sqlite_pragmas
from .schema import DEAD, QUEUED, WATCHING, DeliveryRow, RecordResult, insert_deliveries, known_batches

try:
    import fcntl
except ImportError:  # Windows: SQLite's own lock alone
    fcntl = None  # type: ignore[assignment]


@dataclasses.dataclass
class _Pending:
    """One delivery waiting for a group commit, and what it answers."""

    row: DeliveryRow
    queue_batch: bool
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: Set (with `done`) when this delivery's thread is to commit the next group itself.
    lead: bool = False
    result: RecordResult | None = None
    error: LedgerUnavailable | None = None


class GroupCommit:
    """Records one process's deliveries in groups: one transaction, one fsync, many 200s.

    Why: every durable commit waits for an fsync, and requests each committing their own delivery
    spent their time waiting for each other (BENCHMARKS.md, "Ingest").

    So the requests of a process commit for each other (leader and followers, no extra thread): a
    request that finds no commit running commits every delivery waiting at that moment, its own
    included, in one transaction; requests arriving meanwhile wait, and the first of them leads the
    next group. On an idle receiver a delivery commits alone, at once.

    What ingest promises is unchanged: each delivery and its job are in a committed transaction
    before `record` returns, so before the 200; deduplication is still the primary key with ON
    CONFLICT, a duplicate inside one group included. When the database fails (locked past the busy
    timeout, disk full, connection lost) every delivery of the group gets LedgerUnavailable, so a
    503, and BatchRouter retries; any other failure is retried one delivery at a time, so that only
    the one at fault fails. tests/test_ledger.py runs the same tests on both databases.

    Subclasses say how a group is written (`_commit_group`), which errors mean the database itself
    failed (`_is_outage`) and how to start afresh after one (`_reset`).
    """

    #: Rows per multi-row INSERT: 6 parameters each stays far below SQLite's 32,766 variables (and
    #: PostgreSQL's 65,535 parameters).
    ROWS_PER_INSERT = 500
    #: Batch ids this process remembers having made known, so that the many progress events of
    #: one batch add no statement after its first (and a group of them stays one statement without
    #: BEGIN on SQLite). Known rows are never deleted, so a remembered id stays true; bounded.
    KNOWN_MEMORY = 50_000

    def __init__(self, run_blocking: BlockingRunner = run_in_place) -> None:
        self._run_blocking = run_blocking
        self._ready_first = ready_first()
        self._lock = threading.Lock()
        self._waiting: list[_Pending] = []
        self._busy = False  # a leader is committing
        self._closed = False
        self._pid = os.getpid()
        self._known: set[str] = set()

    def record(self, row: DeliveryRow, *, queue_batch: bool) -> RecordResult:
        item = _Pending(row, queue_batch)
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's connection is not ours
                self._pid, self._waiting, self._busy = os.getpid(), [], False
                self._forget()
            if self._closed:
                raise LedgerUnavailable("ledger unavailable: it was closed")
            self._waiting.append(item)
            lead = not self._busy
            self._busy = True
        if not lead:
            item.done.wait()
        if lead or item.lead:
            self._lead()
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if not self._busy and self._pid == os.getpid():
                self._reset()

    def _lead(self) -> None:
        """Commit every delivery waiting now, wake their threads, hand the lead to the next one."""
        # Under gevent the other requests of the process run only when this one waits: let those
        # that are ready reach the queue first. Leading at once committed groups of one delivery,
        # then of the rest, two commits where one does (BENCHMARKS.md, "Ingest").
        self._ready_first()
        with self._lock:
            group, self._waiting = self._waiting, []
        try:
            self._run_blocking(lambda: self._commit_group(group))
        except Exception as exc:  # the database, or a bug: either way no request may wait for ever
            self._reset()  # a fresh connection for what follows
            self._known.clear()  # the ids this group added to it were rolled back
            if len(group) > 1 and not self._is_outage(exc):
                # Not the database (locked, full, gone) but maybe one delivery's data: one at a time,
                # so that only the delivery at fault fails.
                for item in group:
                    self._commit_alone(item)
            else:
                error = _unavailable(exc)
                for item in group:
                    item.error = error
        with self._lock:
            successor = self._waiting[0] if self._waiting else None
            if successor is None:
                self._busy = False
                if self._closed:
                    self._reset()
            else:
                successor.lead = True
        # The next leader first: under gevent a set() queues the waiter behind those set before it,
        # and the group's requests each write a response and parse the next request before
        # yielding, so waking it last left no commit in flight for all that time.
        if successor is not None:
            successor.done.set()
        for item in group:
            item.done.set()

    def _commit_alone(self, item: _Pending) -> None:
        item.result = None
        try:
            self._run_blocking(lambda: self._commit_group([item]))
        except Exception as exc:
            self._reset()
            self._known.clear()
            item.error = _unavailable(exc)

    def _commit_group(self, group: list[_Pending]) -> None:
        raise NotImplementedError

    def _settle(
        self,
        group: list[_Pending],
        insert: Callable[[list[_Pending]], Iterable[str]],
        know: Callable[[list[tuple[str, float]]], object],
        queue_job: Callable[[str, float], bool],
    ) -> None:
        if len(self._known) > self.KNOWN_MEMORY:
            self._known.clear()
        _settle(group, self.ROWS_PER_INSERT, self._known, insert, know, queue_job)

    def _is_outage(self, exc: Exception) -> bool:
        raise NotImplementedError

    def _reset(self) -> None:
        """Drop connections and locks after a failure or at close (never during a commit)."""

    def _forget(self) -> None:
        """After a fork: the parent's connections are not ours to use or to close."""


def _unavailable(exc: Exception) -> LedgerUnavailable:
    return LedgerUnavailable(f"ledger unavailable: {describe(exc)}")


def _settle(
    group: list[_Pending],
    rows_per_insert: int,
    known: set[str],
    insert: Callable[[list[_Pending]], Iterable[str]],
    know: Callable[[list[tuple[str, float]]], object],
    queue_job: Callable[[str, float], bool],
) -> None:
    """Record a group inside the caller's transaction and give every delivery its answer.

    `insert` adds a chunk of deliveries (ON CONFLICT DO NOTHING) and returns the event ids it
    inserted; `know` makes a chunk of (batch id, first seen) known to the polling fallback (ON
    CONFLICT DO NOTHING), skipping the ids in `known` and adding the others to it; `queue_job`
    queues a terminal delivery's batch and says whether it did.
    """
    firsts: dict[str, _Pending] = {}
    for item in group:
        if item.row.event_id in firsts:
            item.result = _DUPLICATE  # the same event twice in one group: the first one counts
        else:
            firsts[item.row.event_id] = item
    unique = list(firsts.values())
    inserted: set[str] = set()
    for start in range(0, len(unique), rows_per_insert):
        inserted.update(insert(unique[start : start + rows_per_insert]))
    named: dict[str, float] = {}
    for item in unique:
        if item.row.batch_id is not None and item.row.batch_id not in known and item.row.event_id in inserted:
            named.setdefault(item.row.batch_id, item.row.received_at)
    rows = list(named.items())
    for start in range(0, len(rows), rows_per_insert):
        know(rows[start : start + rows_per_insert])
    known.update(named)
    for item in unique:
        if item.row.event_id not in inserted:
            item.result = _DUPLICATE
        elif not item.queue_batch:
            item.result = RecordResult(item.row.outcome, False)
        else:
            assert item.row.batch_id is not None  # queue_batch is only set for deliveries naming one
            item.result = RecordResult("accepted", queue_job(item.row.batch_id, item.row.received_at))


class SQLiteGroupCommit(GroupCommit):
    """The group commit on SQLite, through sqlite3 directly (SQLAlchemy's own work was ~0.4 ms a
    commit). Processes take turns on a flock beside the database rather than SQLite's polling. The
    deliveries go in with `schema.insert_deliveries` compiled to SQLite's SQL once per number of rows
    (:func:`_sqlite_insert_deliveries`), so sqlite3 runs the very text SQLAlchemy would; the other two
    statements are the SQLite form of `Ledger._know` and `Ledger._queue(revive=(DEAD,))`, by hand:
    they are written with constants inline, one parameter each per row.
    """

    KNOW_BATCHES = (
        "INSERT INTO known_batches (batch_id, source, state, first_seen_at, polls, found_by_poll) VALUES {rows} "
        "ON CONFLICT (batch_id) DO NOTHING"
    )
    QUEUE_JOB = (
        "INSERT INTO jobs (batch_id, state, attempts, next_attempt_at, origin, created_at, updated_at) "
        f"VALUES (?1, '{QUEUED}', 0, ?2, 'webhook', ?2, ?2) "
        f"ON CONFLICT (batch_id) DO UPDATE SET state = '{QUEUED}', attempts = 0, next_attempt_at = ?2, "
        f"updated_at = ?2, last_error = NULL WHERE jobs.state = '{DEAD}' RETURNING batch_id"
    )

    def __init__(self, path: str, busy_timeout_seconds: float, run_blocking: BlockingRunner = run_in_place) -> None:
        super().__init__(run_blocking)
        self._path = path
        self._busy_timeout = busy_timeout_seconds
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    def _is_outage(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.OperationalError)

    def _forget(self) -> None:
        self._conn, self._lock_fd = None, None

    def _commit_group(self, group: list[_Pending]) -> None:
        """Only files and sqlite3 here, no locks or events of the requests, so that it may run on
        another native thread (`run_blocking`)."""
        with self._turn():
            self._commit(self._connection(), group)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout, check_same_thread=False)
            sqlite_pragmas(conn, self._busy_timeout)
            self._conn = conn
        return self._conn

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """Take turns with the other processes' leaders on a lock file beside the database.

        SQLite's own lock makes a waiting writer poll, sleeping 1, 2, 5, 10 ms and more between
        tries; a blocked flock(2) wakes the moment the lock is released. Only these group commits
        take it; every other write relies on SQLite's lock (and its busy timeout) alone.
        """
        if fcntl is None:
            yield
            return
        if self._lock_fd is None:
            self._lock_fd = os.open(self._path + "-commit.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _commit(self, conn: sqlite3.Connection, group: list[_Pending]) -> None:
        """One transaction for the group, in as few statements as possible.

        Each statement releases the GIL and must win it back, which can cost milliseconds in a busy
        process, so the deliveries go in one multi-row INSERT rather than one INSERT each. Only
        terminal events (about one per batch) add a statement: their job; and the batches the group
        names one more, to make them known (the polling fallback), unless this process made them
        known before. Deliveries that add nothing but themselves, in one statement, need no BEGIN and COMMIT: a single statement is its own transaction
        in autocommit mode (atomic, and durable at its end with synchronous=FULL).
        """
        alone = len(group) <= self.ROWS_PER_INSERT and not any(
            item.queue_batch or (item.row.batch_id is not None and item.row.batch_id not in self._known) for item in group
        )
        if not alone:
            conn.execute("BEGIN IMMEDIATE")
        try:
            self._settle(
                group,
                lambda chunk: [
                    row[0] for row in conn.execute(_sqlite_insert_deliveries(len(chunk)), [v for item in chunk for v in item.row])
                ],
                lambda rows: conn.execute(
                    self.KNOW_BATCHES.format(rows=", ".join([f"(?, 'delivery', '{WATCHING}', ?, 0, 0)"] * len(rows))),
                    [v for row in rows for v in row],
                ),
                lambda batch_id, now: bool(conn.execute(self.QUEUE_JOB, (batch_id, now)).fetchall()),
            )
            if not alone:
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the connection is closed and replaced by the caller
            raise


class PostgresGroupCommit(GroupCommit):
    """The group commit on PostgreSQL, through the ledger's pooled engine. psycopg waits
    cooperatively under gevent, so it runs in place; several processes and machines commit side
    by side (PostgreSQL's row locks serialize what must be)."""

    def __init__(self, engine: Engine, queue: Callable[[Connection, str, float], bool]) -> None:
        super().__init__(run_in_place)
        self._engine = engine
        self._queue = queue

    def _is_outage(self, exc: Exception) -> bool:
        return isinstance(exc, (OperationalError, InterfaceError))

    def _commit_group(self, group: list[_Pending]) -> None:
        with self._engine.begin() as conn:
            self._settle(
                group,
                lambda chunk: conn.execute(
                    insert_deliveries(postgresql.insert, [item.row._asdict() for item in chunk])
                ).scalars(),
                lambda rows: conn.execute(
                    postgresql.insert(known_batches)
                    .values(
                        [
                            {
                                "batch_id": b,
                                "source": "delivery",
                                "state": WATCHING,
                                "first_seen_at": t,
                                "polls": 0,
                                "found_by_poll": False,
                            }
                            for b, t in rows
                        ]
                    )
                    .on_conflict_do_nothing(index_elements=["batch_id"])
                ),
                lambda batch_id, now: self._queue(conn, batch_id, now),
            )


@functools.lru_cache(maxsize=GroupCommit.ROWS_PER_INSERT)
def _sqlite_insert_deliveries(rows: int) -> str:
    """`schema.insert_deliveries` for `rows` rows as SQLite SQL with `?` parameters, taking a
    delivery row's fields in order, row after row. Compiled once per size: compiling costs more than
    SQLite's insert itself (BENCHMARKS.md, "Ingest")."""
    names = [[f"{field}_{i}" for field in DeliveryRow._fields] for i in range(rows)]
    stmt = insert_deliveries(sqlite.insert, [{f: sa.bindparam(n) for f, n in zip(DeliveryRow._fields, row)} for row in names])
    compiled = stmt.compile(dialect=sqlite.dialect())
    if list(compiled.positiontup or ()) != [n for row in names for n in row]:  # the flat parameter list relies on it
        raise AssertionError(f"unexpected parameter order compiling the delivery insert: {compiled.positiontup}")
    return str(compiled)


_DUPLICATE = RecordResult("duplicate", False)

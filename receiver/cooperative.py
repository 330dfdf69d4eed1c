"""Blocking calls under gunicorn's gevent worker: run them where they do not stop the other requests.

sqlite3 is C code that gevent cannot patch: a commit that waits for its fsync would stop every
greenlet of the process for that long. `blocking_runner()` gives the ledger a way to run such a
call on gevent's pool of native threads while the event loop goes on serving; outside gevent (the
CLI, the worker, tests calling the app directly) there is nothing to avoid and calls run in place.

`ready_first()` is the other half: a way for a group commit's leader to let every request that is
ready to run reach the ledger before it chooses the group, so that a commit carries them all
instead of only its own delivery (BENCHMARKS.md, "Ingest").
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Runs a blocking function and returns its result (or raises its exception).
BlockingRunner = Callable[[Callable[[], T]], T]


def run_in_place(fn: Callable[[], T]) -> T:
    return fn()


def carry_on() -> None:
    """Threads need no invitation: the others run meanwhile."""


def _under_gevent() -> bool:
    monkey = sys.modules.get("gevent.monkey")  # never import gevent here: only a gevent worker has it
    return monkey is not None and monkey.is_module_patched("threading")


def ready_first() -> Callable[[], None]:
    """Under gevent, a call that lets every greenlet that is ready run until it waits (its request
    then queued for the commit); elsewhere one that returns at once."""
    if not _under_gevent():
        return carry_on
    import gevent

    def let_the_ready_run() -> None:
        gevent.sleep(0)

    return let_the_ready_run


def blocking_runner() -> BlockingRunner:
    """gevent's native thread pool when this process is monkey-patched by gevent, else in place."""
    if not _under_gevent():
        return run_in_place
    import gevent

    def run_on_native_thread(fn: Callable[[], T]) -> T:
        return gevent.get_hub().threadpool.apply(fn)

    return run_on_native_thread

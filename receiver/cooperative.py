"""Blocking calls under gunicorn's gevent worker: run them where they do not stop the other requests.

sqlite3 is C code that gevent cannot patch: a commit that waits for its fsync would stop every
greenlet of the process for that long. `blocking_runner()` gives the ledger a way to run such a
call on gevent's pool of native threads while the event loop goes on serving; outside gevent (the
CLI, the worker, tests calling the app directly) there is nothing to avoid and calls run in place.
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


def blocking_runner() -> BlockingRunner:
    """gevent's native thread pool when this process is monkey-patched by gevent, else in place."""
    monkey = sys.modules.get("gevent.monkey")  # never import gevent here: only a gevent worker has it
    if monkey is None or not monkey.is_module_patched("threading"):
        return run_in_place
    import gevent

    def run_on_native_thread(fn: Callable[[], T]) -> T:
        return gevent.get_hub().threadpool.apply(fn)

    return run_on_native_thread

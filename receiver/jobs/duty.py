"""One shape for the worker's background duties (lease heartbeat, poller, notifier, housekeeping).

Each duty is a small class with ``start``/``stop``/``join`` that runs :meth:`Duty.tick` on a thread of
its own, so the claim loop never waits for one, SIGTERM stops them all the same way, and a bug or a
ledger outage in one round is logged and retried next round instead of killing the thread. The
worker starts its duties from one list (``Worker.duties``); a new one (a sender, a retention step) is
one more subclass, not another thread shape.
"""

from __future__ import annotations

import logging
import threading

from ..errors import LedgerUnavailable

log = logging.getLogger(__name__)


class Duty:
    """A background duty: :meth:`tick` every `interval` seconds until :meth:`stop`.

    `tick` returns True when more work is due at once (a backlog), so the next round starts without
    waiting; False (or an error) waits one interval. `stop` is safe to call from a signal handler:
    it only sets an event.
    """

    #: Thread name and log prefix.
    name = "duty"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """The thread's body; also callable directly (tests, one-shot commands)."""
        self.started()
        try:
            while not self.stopping.is_set():
                try:
                    busy = self.tick()
                except LedgerUnavailable as exc:
                    log.error("%s: the ledger is unavailable: %s", self.name, exc)
                    busy = False
                except Exception:  # one bad round must not end the duty for good
                    log.exception("%s: unexpected error", self.name)
                    busy = False
                if not busy:
                    self.stopping.wait(self.interval)
        finally:
            self.finished()

    def tick(self) -> bool:
        """Do one round of the duty; True when more is due at once."""
        raise NotImplementedError

    def started(self) -> None:
        """Called on the duty's thread before the first round (log what it does)."""

    def finished(self) -> None:
        """Called on the duty's thread after the last round (close clients)."""

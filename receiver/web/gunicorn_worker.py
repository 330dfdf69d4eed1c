"""gunicorn's gevent worker, with a deadline on every client read and a polite close.

Why gevent rather than threads: a delivery's 200 waits for an fsync, and greenlets wait for it at
the cost of a switch where OS threads fought over the GIL (BENCHMARKS.md, "Ingest"). A stalled
client holds a greenlet, not a thread, so a few dozen of them no longer stop the hook.

gunicorn's worker puts client sockets in blocking mode with no timeout; here each read and write
gets RECEIVER_CLIENT_TIMEOUT_SECONDS instead (a stalled body then ends in a 408, ingest.py), and a
connection closed with unread request bytes is drained briefly before the close, so the client
reads our 408/413 instead of a reset.

After each request a connection yields to the others before reading its next one. A greenlet only
switches when a read would block, so a client that has its next request on the wire by the time
the response is written (a busy sender, or one that pipelines) was served again and again while
the other connections of the process waited, and the slowest requests paid for it (BENCHMARKS.md,
"Ingest"). tests/test_slow_clients.py pins it.
"""

from __future__ import annotations

import socket
import time

import gevent
from gunicorn.workers.ggevent import GeventWorker

from ..config import Settings

#: How long a closing connection may take to send its FIN (gunicorn's own graceful close allows 2 s).
LINGER_SECONDS = 0.5


class ReceiverGeventWorker(GeventWorker):
    def init_process(self) -> None:
        # gunicorn_conf validated the settings before any worker started.
        self.client_timeout = Settings.from_env().web.client_timeout_seconds
        super().init_process()

    def handle_quit(self, sig, frame):
        # Ctrl-C on a terminal signals the whole group: the worker gets SIGINT from the terminal
        # and then SIGQUIT from its master. gunicorn's gevent worker spawns a greenlet that calls
        # sys.exit for each; the second one runs during interpreter shutdown and prints a
        # SystemExit traceback. One quit is enough.
        if getattr(self, "_quitting", False):
            return
        self._quitting = True
        super().handle_quit(sig, frame)

    def handle(self, listener, client, addr):
        # The parent sets blocking mode (no timeout) first; its settimeout(None) would undo ours,
        # so skip it and go straight to the AsyncWorker's loop.
        client.settimeout(self.client_timeout)
        super(GeventWorker, self).handle(listener, client, addr)

    def handle_request(self, listener_name, req, sock, addr):
        try:
            keep_going = super().handle_request(listener_name, req, sock, addr)
        except StopIteration:  # the response asked to close the connection (Connection: close)
            _linger_and_shut(sock)
            raise
        gevent.sleep(0)  # the other ready connections first (module docstring)
        return keep_going


def _linger_and_shut(sock: socket.socket) -> None:
    """RFC 9112 §9.6 close, minus the close itself: FIN, drain until the peer's FIN or the linger
    time, then shut both directions. Unread request bytes at close would make the kernel send a
    reset, which can destroy the response the client has not read yet."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        while drained < 65536:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            data = sock.recv(4096)
            if not data:
                break
            drained += len(data)
        sock.shutdown(socket.SHUT_RD)
    except OSError:  # the peer is gone, or the socket already shut: nothing left to wait for
        pass

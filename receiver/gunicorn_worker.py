"""gunicorn's gthread worker, with no client able to stall its main loop.

gunicorn (27) closes a finished connection on the worker's main thread, and closes it "gracefully":
it half-closes, then waits up to 2 s for the client to close its side. A client that never does
(a stalled or hostile one) costs the main loop those 2 s each, during which it neither accepts nor
tells the arbiter it is alive; a few dozen such clients got whole workers killed for timeout
(tests/test_slow_clients.py). Here the request thread, which has time to wait, does that wait
itself and shuts the socket down, so the main thread's close finds nothing left to wait for.
It subclasses gunicorn internals: on a gunicorn whose `handle` returns something else it does nothing.
"""

from __future__ import annotations

import socket
import time

from gunicorn.workers.gthread import ThreadWorker

#: How long a closing connection may take to send its FIN. gunicorn allows 2 s; BatchRouter is a
#: server on a fast network, and a stalled client would hold a request thread for the whole linger.
LINGER_SECONDS = 0.5


class ReceiverThreadWorker(ThreadWorker):
    def handle(self, conn):  # type: ignore[no-untyped-def]
        result = super().handle(conn)
        if result is False:  # gunicorn 27: the connection is to be closed (True: keep-alive; else: deferred)
            _linger_and_shut(conn.sock)
        return result


def _linger_and_shut(sock: socket.socket) -> None:
    """RFC 9112 §9.6 close, minus the close itself: FIN, drain until the peer's FIN or the linger
    time, then shut both directions (a later shutdown or recv returns at once)."""
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

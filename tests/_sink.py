"""A notification consumer for the tests: a real HTTP server on loopback that can refuse, fail at
random, go down and come back on the same port, and records every POST with its timing."""

from __future__ import annotations

import base64
import dataclasses
import random
import threading
import time
from collections import deque
from typing import Any

import standardwebhooks
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from .conftest import free_port

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@dataclasses.dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int
    started: float
    ended: float


class Sink:
    """The consumer: answers each POST with the next queued status (then 200), records everything,
    and can go down and come back on the same port."""

    def __init__(self, port: int | None = None, delay: float = 0.0, fail_ratio: float = 0.0, seed: str = "sink") -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.statuses: deque[int] = deque()
        self.delay = delay
        self.fail_ratio = fail_ratio
        self._rng = random.Random(seed)
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: Any = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        started = time.monotonic()
        request = Request(environ)
        body = request.get_data()
        time.sleep(self.delay)
        with self._lock:
            status = self.statuses.popleft() if self.statuses else 200
            if status == 200 and self._rng.random() < self.fail_ratio:
                status = 500
            self.received.append(Received(dict(request.headers), body, status, started, time.monotonic()))
        return Response(b"ok", status=status)(environ, start_response)

    def up(self) -> Sink:
        self._server = make_server("127.0.0.1", self.port, self, threaded=True)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def received_since(self, index: int) -> list[Received]:
        """Every POST from the `index`th on, for a reader that follows the sink as it runs."""
        with self._lock:
            return self.received[index:]

    def delivered(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.status == 200]


def verify(received: Received) -> dict[str, Any]:
    """The event, checked by standardwebhooks (it raises on a bad signature or stale timestamp)."""
    headers = {k.lower(): v for k, v in received.headers.items()}
    return standardwebhooks.Webhook(SECRET).verify(received.body, headers)

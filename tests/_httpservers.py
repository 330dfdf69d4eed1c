"""Real HTTP servers for the network tests: werkzeug's server in a thread, on 127.0.0.1, port 0.

`ArtifactServer` serves artifacts the way an object store does (Range support optional) and can be
told to misbehave for the next requests: answer a status, drop the connection, stall, redirect.
`ScriptedServer` answers each (method, path) from a queue of canned responses, for the API client.
Both record what they saw, so tests assert on the wire, not on our code's internals.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

logging.getLogger("werkzeug").setLevel(logging.ERROR)


class LiveServer:
    """A WSGI app served on 127.0.0.1 in a daemon thread; use as a context manager."""

    def __init__(self, app: Any) -> None:
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Seen:
    method: str
    path: str
    raw_uri: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Artifact:
    body: bytes
    content_type: str = "application/x-ndjson"
    content_encoding: str | None = None
    etag: str | None = None

    def __post_init__(self) -> None:
        if self.etag is None:
            self.etag = '"' + hashlib.md5(self.body).hexdigest() + '"'


@dataclass
class Fault:
    """One misbehaviour for one request: the first matching fault in the queue is used up."""

    kind: str  # "status", "drop", "stall", "redirect", "no-range"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    after: int = 0  # bytes of body sent before a drop or a stall
    seconds: float = 0.0
    location: str = ""


class ArtifactServer:
    """A WSGI app serving `artifacts` by path, honouring `Range: bytes=N-` when `ranges` is true."""

    def __init__(self, artifacts: dict[str, Artifact], *, ranges: bool = True) -> None:
        self.artifacts = artifacts
        self.ranges = ranges
        self.faults: deque[Fault] = deque()
        self.seen: list[Seen] = []
        #: Set when a stall ends: a client that stopped before it did never waited for its timeout.
        self.stall_over = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        with self._lock:
            self.seen.append(Seen(request.method, request.path, environ.get("RAW_URI", ""), dict(request.headers)))
            fault = self.faults.popleft() if self.faults else None
        if fault is not None and fault.kind == "status":
            return Response(b"nope", status=fault.status, headers=fault.headers)(environ, start_response)
        if fault is not None and fault.kind == "redirect":
            return Response(b"", status=fault.status or 302, headers={"Location": fault.location})(environ, start_response)
        artifact = self.artifacts.get(request.path)
        if artifact is None:
            return Response(b"not found", status=404)(environ, start_response)
        body = artifact.body
        status = "200 OK"
        headers = [("Content-Type", artifact.content_type), ("ETag", artifact.etag or "")]
        if artifact.content_encoding:
            headers.append(("Content-Encoding", artifact.content_encoding))
        match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
        if match and self.ranges and not (fault is not None and fault.kind == "no-range"):
            start = int(match.group(1))
            headers.append(("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}"))
            body = body[start:]
            status = "206 Partial Content"
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        if fault is not None and fault.kind == "drop":
            return _then_drop(body[: fault.after], environ["werkzeug.socket"])
        if fault is not None and fault.kind == "stall":
            return _then_stall(body[: fault.after], fault.seconds, self.stall_over)
        return _blocks(body)


def _blocks(body: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    view = memoryview(body)
    for start in range(0, len(body), size):
        yield bytes(view[start : start + size])


def _then_drop(head: bytes, sock: socket.socket) -> Iterator[bytes]:
    if head:
        yield head
    sock.shutdown(socket.SHUT_RDWR)


def _then_stall(head: bytes, seconds: float, over: threading.Event) -> Iterator[bytes]:
    if head:
        yield head
    time.sleep(seconds)
    over.set()


@dataclass
class Canned:
    status: int = 200
    body: Any = None  # a dict/list is sent as JSON; bytes as they are
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class ScriptedServer:
    """Answers each (method, path) with the next canned response queued for it (the last repeats)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], deque[Canned]] = {}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()

    def on(self, method: str, path: str, *responses: Canned) -> None:
        self.routes[(method, path)] = deque(responses)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        raw_uri = environ.get("RAW_URI", "")
        path = raw_uri.split("?", 1)[0]
        with self._lock:
            self.seen.append(Seen(request.method, path, raw_uri, dict(request.headers), request.get_data()))
            queue = self.routes.get((request.method, path))
            if not queue:
                canned = Canned(404, {"error": {"code": "not_found", "message": "no such route"}})
            elif len(queue) > 1:
                canned = queue.popleft()
            else:
                canned = queue[0]
        if canned.delay:
            time.sleep(canned.delay)
        body = canned.body
        headers = dict(canned.headers)
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        return Response(body or b"", status=canned.status, headers=headers)(environ, start_response)

"""moto_server as a real process over HTTP, and a TCP proxy that can fake an outage in front of it.

Plain functions and context managers, so any conftest can turn them into fixtures:

    with aws_test_env(), moto_server() as endpoint:      # http://127.0.0.1:PORT
        with FlakyProxy.to(endpoint) as proxy:           # proxy.url, proxy.fail(), proxy.heal()
            ...
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from urllib.parse import urlsplit

#: The credentials and region moto expects; never real ones.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
#: Variables that would point boto3 at a real account or another endpoint.
_AWS_UNSET = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def aws_test_env(credentials: Mapping[str, str] = AWS_TEST_ENV, **extra: str) -> Iterator[None]:
    """Set fake AWS credentials (moto's unless `credentials` are given) and `extra` in os.environ
    for the block, then restore it. Credentials of another server replace moto's whole, session
    token included."""
    saved = dict(os.environ)
    for name in (*_AWS_UNSET, *AWS_TEST_ENV):
        os.environ.pop(name, None)
    os.environ["AWS_CONFIG_FILE"] = os.devnull
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    os.environ.update(credentials)
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def moto_server(*, env: dict[str, str] | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Start `moto_server` on a free loopback port, yield its URL once it answers, stop it after."""
    child_env = {**os.environ, **AWS_TEST_ENV, **(env or {})}
    last_error: Exception | None = None
    for _attempt in range(3):  # a free port can be taken between the probe and moto's bind
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
        )
        try:
            _wait_ready(url, proc, timeout)
        except Exception as exc:  # noqa: BLE001 - retried, then reported with moto's log
            stop_process(proc)
            log.seek(0)
            last_error = RuntimeError(f"moto_server did not start: {exc}\n{log.read()[-2000:].decode(errors='replace')}")
            log.close()
            continue
        try:
            yield url
        finally:
            stop_process(proc)
            log.close()
        return
    assert last_error is not None
    raise last_error


def reset_moto(endpoint: str) -> None:
    """Forget every bucket and resource (moto's /moto-api/reset)."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST", data=b"")
    urllib.request.urlopen(request, timeout=10).close()


def set_moto_auth(endpoint: str, free_actions: float) -> None:
    """Make moto enforce IAM after `free_actions` more requests (0: at once; inf: never)."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        method="POST",
        data=str(free_actions).encode(),
        headers={"Content-Type": "text/plain"},  # moto reads the raw body, not a form
    )
    urllib.request.urlopen(request, timeout=10).close()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1).close()
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout} s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of an HTTP endpoint that can fail on demand.

    `fail()` resets every open connection (RST: SO_LINGER 0) and every new one until `heal()`, the
    way a load balancer or a network path dropping out looks to a client. It forwards bytes and
    knows nothing of HTTP.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.failing = False
        #: Connections accepted (and reset) while failing: a test can check the outage was hit.
        self.resets = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="flaky-proxy", daemon=True)
        self._thread.start()

    @classmethod
    @contextlib.contextmanager
    def to(cls, endpoint: str) -> Iterator[FlakyProxy]:
        parts = urlsplit(endpoint)
        proxy = cls(parts.hostname or "127.0.0.1", parts.port or 80)
        try:
            yield proxy
        finally:
            proxy.close()

    def fail(self) -> None:
        """From now on reset every connection, open or new."""
        with self._lock:
            self.failing = True
            sockets = list(self._sockets)
        for sock in sockets:
            _reset(sock)

    def heal(self) -> None:
        with self._lock:
            self.failing = False

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _reset(sock)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                failing = self.failing
                if failing:
                    self.resets += 1
            if failing:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy both ways until either side closes or errs, then drop both."""
        pair = {client: upstream, upstream: client}
        try:
            while True:
                readable, _, _ = select.select(list(pair), [], [], 0.5)
                if self._closed.is_set():
                    return
                for sock in readable:
                    data = sock.recv(256 * 1024)
                    if not data:
                        return
                    pair[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._sockets.difference_update((client, upstream))
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0, which sends RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()

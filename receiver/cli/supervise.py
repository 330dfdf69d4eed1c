"""`receiver serve`: the web server and the worker as child processes, stopped together.

Two processes rather than threads, because that is what the Procfile runs in production: the same
gunicorn and the same worker, so development exercises the real thing.

Start-up is all or nothing: a port that is taken is refused before anything starts, and if a child
exits before every server answers, the others are stopped and no "serving on" line is ever printed.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..config import Settings
from ._common import ConfigurationError, Failure

EMULATOR_KEY = "br_test_emulator"
#: Written by `serve --emulator` for a second shell: `set -a; . receiver-data/emulator.env; set +a`.
EMULATOR_ENV_FILE = Path("receiver-data") / "emulator.env"
#: Long enough for gunicorn's two workers to import the app on a busy 2-core machine.
START_TIMEOUT_SECONDS = 60.0


def check_port_free(host: str, port: int, remedy: str) -> None:
    """Refuse a port that is already taken, with one line saying how to choose another.

    Bound the way the servers bind (SO_REUSEADDR, so a port in TIME_WAIT is not a false alarm);
    on Linux a wildcard bind also fails when another program holds the port on one address.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigurationError(f"port {port} is already in use; {remedy}") from None
            raise ConfigurationError(f"cannot listen on {host}:{port} ({exc.strerror}); {remedy}") from None


class Supervisor:
    """The children of `receiver serve`, and the signal that stops them all."""

    def __init__(self) -> None:
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stop_signal = 0
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        # A process group of its own: Ctrl-C on a terminal signals the whole foreground group, and
        # gunicorn's gevent workers, hit by SIGINT directly, die in a SystemExit traceback. Here
        # only `serve` hears it, and stops every child with SIGTERM as for any other stop.
        self.children[name] = subprocess.Popen(args, env=env, process_group=0)

    def _exited(self) -> tuple[str, int] | None:
        for name, child in self.children.items():
            if child.poll() is not None:
                return name, child.returncode
        return None

    def wait_until_up(self, urls: list[str], timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Return once every URL answers; stop everything and fail if a child exits or time runs out."""
        deadline = time.monotonic() + timeout
        pending = list(urls)
        while pending:
            if self.stop_signal:
                self.stop()
                raise SystemExit(0)
            exited = self._exited()
            if exited is not None:
                self.stop()
                raise Failure(f"{exited[0]} exited ({exited[1]}) before it answered; stopped everything (its output is above)")
            if time.monotonic() > deadline:
                self.stop()
                raise Failure(f"{pending[0]} did not answer within {timeout:.0f}s; stopped everything")
            try:
                with urllib.request.urlopen(pending[0], timeout=1):
                    pending.pop(0)
                    continue
            except OSError:
                pass
            time.sleep(0.2)

    def run(self) -> int:
        """Wait until a child exits or a signal arrives; then stop every child."""
        code = 0
        while not self.stop_signal:
            exited = self._exited()
            if exited is not None:
                code = exited[1] or 1
                print(f"receiver: {exited[0]} exited ({exited[1]}); stopping", file=sys.stderr)
                break
            time.sleep(0.2)
        self.stop()
        return code

    def stop(self) -> None:
        """SIGTERM to every child still running, SIGKILL to any that outlives 30 s."""
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for child in self.children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def emulator_args(port: int, *extra: str, api_key: str = EMULATOR_KEY, host: str = "127.0.0.1") -> list[str]:
    """`receiver emulator` on loopback (or `host`: a container's published port arrives on its own
    interface, not on loopback), taking the receiver's plain-http loopback webhook (the tests and
    benchmarks start it the same way, with `extra` options)."""
    return [
        sys.executable,
        "-m",
        "receiver.emulator",
        "--host",
        host,
        "--port",
        str(port),
        "--api-key",
        api_key,
        "--allow-insecure-webhooks",
        "--allow-private-webhooks",
        *extra,
    ]


def emulator_env(env: dict[str, str], port: int) -> dict[str, str]:
    """The receiver's environment pointed at the emulator on `port`."""
    hosts = ",".join(filter(None, [env.get("RECEIVER_ARTIFACT_HOSTS", ""), "127.0.0.1"]))
    return {
        **env,
        "BATCHROUTER_API_URL": f"http://127.0.0.1:{port}",
        "BATCHROUTER_API_KEY": EMULATOR_KEY,
        "RECEIVER_ARTIFACT_HOSTS": hosts,
    }


def register_with_emulator(settings: Settings, hook_url: str) -> None:
    """What `receiver register --insecure` does, without the self-test: the ledger's current secret
    (a fresh one only when there is none) given to the emulator for its deliveries.

    Reusing it means that starting `serve --emulator` again and again does not pile up accepted
    secrets, each one more key that would verify a forged delivery.
    """
    import secrets as secrets_module

    from ..batchrouter import BatchRouterClient
    from ..ledger import Ledger

    ledger = Ledger.from_settings(settings)
    try:
        ledger.create_schema()
        secret = ledger.current_secret()
        if secret is None:
            secret = secrets_module.token_urlsafe(32)
            ledger.add_secret(secret, grace_seconds=settings.web.secret_grace_seconds)
    finally:
        ledger.close()
    client = BatchRouterClient.from_settings(settings)
    try:
        client.set_delivery_webhook(hook_url, secret)
    finally:
        client.close()


def write_emulator_env(settings: Settings, path: Path = EMULATOR_ENV_FILE) -> Path:
    """The settings a second shell needs for `fetch`, `worker` and `register --insecure` against the
    emulator, as shell assignments. Owner-only (0600): it holds the API key.

    Local paths are made absolute, so the file works from any folder.
    """
    values = {
        "BATCHROUTER_API_URL": settings.api_url,
        "BATCHROUTER_API_KEY": settings.api_key or EMULATOR_KEY,
        "RECEIVER_ARTIFACT_HOSTS": ",".join(settings.worker.artifact_hosts),
        "DATABASE_URL": _absolute_database_url(settings.database_url),
        "RECEIVER_STORAGE_URL": _absolute_storage_url(settings.storage_url),
        "RECEIVER_PUBLIC_URL": f"http://127.0.0.1:{settings.port}/hooks/batchrouter",
    }
    lines = [
        "# Written by `receiver serve --emulator` for a second shell in this folder:",
        "#   set -a; . receiver-data/emulator.env; set +a",
        *(f"{name}={shlex.quote(value)}" for name, value in values.items()),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(partial, path)
    return path


def _absolute_database_url(url: str) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


def _absolute_storage_url(url: str) -> str:
    if "://" in url:
        return url
    return str(Path(url).resolve())

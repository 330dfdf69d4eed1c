"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary folder, on a free port.

Run as the `postgres` system user when the tests run as root (initdb refuses root). Skips when no
PostgreSQL server binaries are installed (`.ci/run` installs them).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .conftest import free_port


def _bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


#: How to restart, stop and start each running cluster, by its URL (restart(), down()).
_RESTART: dict[str, list[str]] = {}
_STOP: dict[str, list[str]] = {}
_START: dict[str, list[str]] = {}


def _cluster_key(url: str) -> str:
    return url.rsplit("/", 1)[0] + "/postgres"


def restart(cluster_url: str) -> None:
    """Stop the cluster (fast: every connection is cut) and start it again, as an operator's
    restart or a failover would; pg_ctl reuses the options it was started with."""
    subprocess.run(_RESTART[_cluster_key(cluster_url)], check=True, capture_output=True)


@contextmanager
def down(cluster_url: str) -> Iterator[None]:
    """The cluster gone for as long as the block runs: an outage longer than a restart, as a crash
    or a failover that takes a while.

    Stopped `immediate`, not `fast`: a fast stop ends the backends one by one, so one that holds a
    lock can release it while another, waiting for it, still runs its statement to the end and
    answers. A test that parks the worker on a lock would then see that statement succeed, and
    which step the outage hit would be luck. `immediate` ends them all at once, releasing
    nothing, and the next start recovers from the write-ahead log as after a crash."""
    subprocess.run(_STOP[_cluster_key(cluster_url)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(_START[_cluster_key(cluster_url)], check=True, capture_output=True)


@contextmanager
def postgres_cluster(*, fsync: bool = False) -> Iterator[str | None]:
    """Yield a `postgresql://` URL of a fresh cluster, or None when PostgreSQL is not installed.

    `fsync` is off for the tests (they never survive a power cut); the benchmarks turn it on, as a
    production database runs."""
    bindir = _bindir()
    if bindir is None:
        yield None
        return
    folder = tempfile.mkdtemp(prefix="receiver-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(folder, "data")
    port = free_port()
    subprocess.run(
        as_user + [f"{bindir}/initdb", "-D", data, "-U", "receiver", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    start = as_user + [
        f"{bindir}/pg_ctl",
        "-D",
        data,
        "-l",
        os.path.join(folder, "log"),
        "-w",
        "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync={'on' if fsync else 'off'}",
        "start",
    ]
    subprocess.run(start, check=True, capture_output=True)
    try:
        url = f"postgresql://receiver@127.0.0.1:{port}/postgres"
        log = os.path.join(folder, "log")
        _RESTART[url] = as_user + [f"{bindir}/pg_ctl", "-D", data, "-l", log, "-m", "fast", "-w", "restart"]
        _STOP[url] = as_user + [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"]
        _START[url] = start
        deadline = time.monotonic() + 20
        while subprocess.run([f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError("PostgreSQL did not start")
            time.sleep(0.2)
        yield url
    finally:
        subprocess.run(as_user + [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def fresh_database(cluster_url: str) -> str:
    """The URL of a new, empty database in the cluster at `cluster_url`."""
    import sqlalchemy as sa

    name = f"t{time.time_ns()}"
    admin = sa.create_engine(cluster_url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return cluster_url.rsplit("/", 1)[0] + "/" + name


def drop_database(database_url: str) -> None:
    """Drop a database `fresh_database` made, closing whatever connections a test left open."""
    import sqlalchemy as sa

    cluster_url, name = database_url.rsplit("/", 1)
    admin = sa.create_engine(
        f"{cluster_url}/postgres".replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    finally:
        admin.dispose()

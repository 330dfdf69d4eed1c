"""Helpers of the reliability suites (tests/test_reliability.py): scale, a stack of real processes,
a concurrent signed sender, ledger and storage readers, process killers, storage outages, figures.

Everything here drives the receiver from outside, as BatchRouter and an operator would: HTTP to
gunicorn and the emulator, signals to processes, the ledger's SQLite file read with sqlite3, the
storage read with os / boto3. Nothing imports the receiver's internals except `sign`.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import queue
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from receiver.cli.supervise import emulator_args
from receiver.signature import HEADER, sign

from .conftest import Emulator, Service, free_port, make_receiver_env, wait_for, wait_http

# --- scale ------------------------------------------------------------------------------------------

SCALE = os.environ.get("RELIABILITY_SCALE", "ci").strip().lower()

#: CI sizes fit the CI time limit on a 2-core machine; `full` is the issue's size (RELIABILITY.md).
SIZES: dict[str, dict[str, int]] = {
    "ci": {"deliveries": 600, "batches": 120, "connections": 50, "chaos_batches": 30, "fuzz_examples": 150},
    "full": {"deliveries": 10_000, "batches": 2_000, "connections": 200, "chaos_batches": 200, "fuzz_examples": 1_500},
}
if SCALE not in SIZES:
    raise RuntimeError(f"RELIABILITY_SCALE must be one of {', '.join(SIZES)}, not {SCALE!r}")
SIZE = SIZES[SCALE]


# --- figures ----------------------------------------------------------------------------------------

_FIGURES_LOCK = threading.Lock()


def record_figures(suite: str, figures: dict[str, Any]) -> None:
    """Print the figures of a suite and, when RELIABILITY_FIGURES names a file, merge them into it."""
    figures = {"scale": SCALE, **figures}
    print(f"\nRELIABILITY {suite}: {json.dumps(figures, sort_keys=True)}")
    target = os.environ.get("RELIABILITY_FIGURES")
    if not target:
        return
    with _FIGURES_LOCK:
        path = Path(target)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[suite] = figures
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- the stack --------------------------------------------------------------------------------------


def new_api_key() -> str:
    return "br_test_" + secrets.token_hex(16)


def new_secret() -> str:
    return "whsec-" + secrets.token_urlsafe(24)


def start_emulator(tmp_path: Path, api_key: str, name: str = "emulator") -> Emulator:
    port = free_port()
    svc = Service(
        name,
        emulator_args(port, "--retry-delays", "0.2,0.5,1,2,3,4,5", "--quiet", api_key=api_key),
        dict(os.environ),
        tmp_path,
    ).start()
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", svc.proc)
    return Emulator(url, svc)


def receiver_env(tmp_path: Path, emulator_url: str, api_key: str, **overrides: str) -> dict[str, str]:
    """conftest's environment, without the caller's AWS_* (each suite sets its own, for moto)."""
    return make_receiver_env(tmp_path, emulator_url, api_key, inherit_aws=False, **overrides)


def store_secret(env: dict[str, str], secret: str) -> None:
    """Store a webhook secret in the ledger, as `receiver register` does."""
    from receiver.ledger import Ledger

    ledger = Ledger(env["DATABASE_URL"])
    ledger.create_schema()
    ledger.add_secret(secret, grace_seconds=3600)
    ledger.close()


def start_web(env: dict[str, str], tmp_path: Path) -> Service:
    """gunicorn with the production settings (receiver.gunicorn_conf), as the Procfile runs it."""
    svc = Service(
        "web",
        [sys.executable, "-m", "gunicorn", "-c", "python:receiver.web.gunicorn_conf", "receiver.app:create_app()"],
        env,
        tmp_path,
    ).start()
    wait_http(f"http://127.0.0.1:{env['PORT']}/healthz", svc.proc)
    return svc


def start_worker(env: dict[str, str], tmp_path: Path, name: str = "worker") -> Service:
    return Service(name, [sys.executable, "-m", "receiver", "worker"], env, tmp_path).start()


def register_webhook(emulator: Emulator, api_key: str, hook_url: str, secret: str) -> None:
    r = requests.put(
        f"{emulator.url}/v1/auth/account/delivery-webhook",
        json={"url": hook_url, "secret": secret},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10,
    )
    r.raise_for_status()


def parallel(fn: Any, items: Iterable[Any], threads: int = 16) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


# --- sending deliveries -----------------------------------------------------------------------------


@dataclass
class Delivery:
    body: bytes
    event_id: str | None = None
    batch_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Answer:
    delivery: Delivery
    status: int
    body: bytes
    retries: int


class Sender:
    """Sends deliveries over `connections` keep-alive connections at once, each on its own thread.

    A request that gets no answer at all (connection reset, closed keep-alive) is sent again on a
    new connection, as BatchRouter would retry it; those resends are counted.
    """

    def __init__(self, url: str, connections: int) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
        self.connections = connections

    def send(self, deliveries: list[Delivery]) -> list[Answer]:
        work: queue.Queue[tuple[int, Delivery] | None] = queue.Queue()
        for item in enumerate(deliveries):
            work.put(item)
        answers: list[Answer | None] = [None] * len(deliveries)
        errors: list[BaseException] = []

        def run() -> None:
            conn: http.client.HTTPConnection | None = None
            try:
                while True:
                    try:
                        item = work.get_nowait()
                    except queue.Empty:
                        return
                    index, delivery = item
                    headers = {"Content-Type": "application/json", **delivery.headers}
                    for retry in range(10):
                        if conn is None:
                            conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
                        try:
                            conn.request("POST", self.path, body=delivery.body, headers=headers)
                            response = conn.getresponse()
                            data = response.read()
                        except (ConnectionError, http.client.HTTPException, OSError):
                            conn.close()
                            conn = None
                            time.sleep(0.05 * (retry + 1))
                            continue
                        answers[index] = Answer(delivery, response.status, data, retry)
                        if response.will_close:
                            conn.close()
                            conn = None
                        break
            except BaseException as exc:  # noqa: BLE001 - reported by send()
                errors.append(exc)
            finally:
                if conn is not None:
                    conn.close()

        threads = [threading.Thread(target=run, daemon=True) for _ in range(self.connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        missing = [i for i, a in enumerate(answers) if a is None]
        assert not missing, f"{len(missing)} deliveries never got an answer after 10 connection attempts"
        return answers  # type: ignore[return-value]


def signed(secret: str, payload: dict[str, Any] | bytes, **meta: Any) -> Delivery:
    body = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    return Delivery(body, headers={HEADER: sign(secret, body)}, **meta)


def progress(secret: str, batch_id: str, n: int = 1) -> Delivery:
    """A signed `batch.progress` delivery, the `n`th for the batch: it makes the batch known (polled)."""
    body = {
        "id": f"evt_progress_{batch_id}_{n}",
        "type": "batch.progress",
        "created": int(time.time()),
        "data": {"batch_id": batch_id, "status": "processing", "items_completed": n},
    }
    return signed(secret, body, event_id=body["id"], batch_id=batch_id)


# --- reading the ledger and the storage -------------------------------------------------------------


def ledger_query(env: dict[str, str], sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the SQLite ledger directly (read-only), the way an operator's script would."""
    path = env["DATABASE_URL"].split(":///", 1)[1]
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def job_states(env: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    return {b: (s, e) for b, s, e in ledger_query(env, "SELECT batch_id, state, last_error FROM jobs")}


def wait_jobs_settled(
    env: dict[str, str], batch_ids: Iterable[str], timeout: float, settled: tuple[str, ...] = ("stored", "dead")
) -> dict[str, tuple[str, str | None]]:
    wanted = set(batch_ids)

    def done() -> dict[str, tuple[str, str | None]] | None:
        states = job_states(env)
        if all(b in states and states[b][0] in settled for b in wanted):
            return states
        return None

    try:
        return wait_for(done, timeout=timeout, interval=1.0, what="every job stored or dead")
    except TimeoutError:
        states = job_states(env)
        stuck = Counter(states.get(b, ("missing", None))[0] for b in wanted)
        raise TimeoutError(f"jobs not settled after {timeout}s: {dict(stuck)}") from None


def secret_leaks(roots: Iterable[Path], texts: Iterable[str], needles: Iterable[str]) -> list[str]:
    """Every log file under `roots` and every captured output in `texts` that contains a needle.

    Storage and the ledger are not logs: the ledger holds the webhook secret by design.
    """
    needles = [n for n in needles if n]
    found: list[str] = []
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.suffix not in (".log", ".out", ".txt"):
                continue
            data = path.read_bytes()
            found += [f"{path}: {n[:6]}…" for n in needles if n.encode() in data]
    for i, text in enumerate(texts):
        found += [f"output #{i}: {n[:6]}…" for n in needles if n in text]
    return found


def log_files(roots: Iterable[Path]) -> list[Path]:
    return [p for root in roots for p in root.rglob("*.log") if p.is_file()]


# --- processes ------------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (gunicorn's workers, under its master)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: fields start after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


# --- storage outages --------------------------------------------------------------------------------


class DiskOutage:
    """A storage root on a small tmpfs that can be filled up (ENOSPC) and freed again.

    Mounting needs CAP_SYS_ADMIN; where the test machine refuses it, the outage is the storage root
    vanishing instead (a symlink to it pointed at nothing, as when a network mount drops out).
    """

    def __init__(self, root: Path, size_mb: int) -> None:
        self.root = root
        self.kind = "tmpfs-full"
        self.real = root.with_name(root.name + ".real")
        self._ballast = root / "ballast.bin"
        self.count = 0
        root.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(root)], capture_output=True)
        if done.returncode != 0:
            root.rmdir()
            self.real.mkdir()
            root.symlink_to(self.real)
            self.kind = "storage-root-vanished"

    def fail(self) -> None:
        self.count += 1
        if self.kind == "tmpfs-full":
            # Unbuffered, so that the last short write fails here and not again at close().
            with open(self._ballast, "wb", buffering=0) as f:
                for block in (b"\0" * (1 << 20), b"\0" * 4096):
                    try:
                        while f.write(block):
                            pass
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
        else:
            self.root.unlink()
            self.root.symlink_to(self.root.with_name("nowhere"))

    def heal(self) -> None:
        if self.kind == "tmpfs-full":
            with contextlib.suppress(FileNotFoundError):
                self._ballast.unlink()
        else:
            self.root.unlink()
            self.root.symlink_to(self.real)

    def close(self) -> None:
        if self.kind == "tmpfs-full":
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True)


def walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root, followlinks=True):
        for name in files:
            yield Path(dirpath) / name


def random_moments(rng: random.Random, low: float, high: float) -> Iterator[float]:
    while True:
        yield rng.uniform(low, high)


def pause(seconds: float, stop: threading.Event) -> bool:
    """Sleep unless `stop` is set first; True when stopped."""
    return stop.wait(seconds)


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False

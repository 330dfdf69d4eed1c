"""What every benchmark script shares: child processes on free ports, a receiver environment, reports.

The benchmarks start the real thing the way the tests do (tests/conftest.py): gunicorn with the
production settings (`receiver.gunicorn_conf`), the emulator as its own server, `receiver worker` as
its own process. Nothing here imports pytest; these are scripts, run under
`flock /tmp/receiver-bench.lock` so that two benchmarks never share the machine's two cores.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from receiver.cli.supervise import EMULATOR_KEY, emulator_args

ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = "python:receiver.web.gunicorn_conf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(method: str, url: str, body: Any = None, timeout: float = 60) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of a process and its descendants still running, from
    /proc: a gunicorn master and its workers. 0.0 where /proc is missing (not Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open(f"/proc/{current}/task/{current}/children") as f:
                todo += [int(child) for child in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
    return total


def wait_http(url: str, proc: Proc | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status < 500:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not come up")
        time.sleep(0.1)


class Proc:
    """A child process writing to its own log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, root: Path = ROOT) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(log_dir))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 30) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_emulator(log_dir: Path, name: str = "emulator") -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        name,
        emulator_args(port, "--quiet"),
        dict(os.environ),
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc)
    return proc, url


def start_gunicorn(
    app: str, env: dict[str, str], log_dir: Path, name: str, extra_args: list[str] = (), root: Path = ROOT
) -> tuple[Proc, str]:
    """gunicorn with the production settings; `extra_args` (e.g. `-w 4`) override them (CLI wins).
    `root` is the checkout it imports (bench/ab_ingest.py serves two)."""
    port = free_port()
    env = {**env, "PORT": str(port)}
    proc = Proc(name, [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF, *extra_args, app], env, log_dir, root)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc)
    return proc, url


def receiver_env(workdir: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The receiver's environment: SQLite and local storage under `workdir`, the emulator as API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECEIVER_", "BATCHROUTER_", "DATABASE_URL"))}
    (workdir / "metrics").mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{workdir}/receiver.db",
            "RECEIVER_STORAGE_URL": str(workdir / "storage"),
            "RECEIVER_ARTIFACT_HOSTS": "127.0.0.1",
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
        }
    )
    if api_url:
        env.update({"BATCHROUTER_API_URL": api_url, "BATCHROUTER_API_KEY": EMULATOR_KEY})
    env.update(extra)
    return env


def peak_rss_kib(pid: int) -> int:
    """The process's resident-set high-water mark (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> dict[str, Any]:
    """What a reader of the figures needs to know about where they came from."""
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": loadavg(),
        "commit": _git_head(),
    }


def _git_head() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except OSError:
        return "?"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(fraction * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def write_json(path: str | None, data: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

"""The README's first command, as a newcomer runs it: `receiver serve --emulator` in an empty folder.

Nothing is configured: the ledger, the storage folder, the webhook secret and the emulator's webhook
all come from the embedded defaults, and a batch completed in the emulator lands on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import ROOT, free_port, read_manifest, run_cli, wait_for


def test_serve_with_emulator_runs_the_readme_walkthrough(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECEIVER_", "BATCHROUTER_", "DATABASE_URL", "PROMETHEUS_"))}
    web_port, emulator_port = free_port(), free_port()
    env.update({"PORT": str(web_port), "PYTHONPATH": str(ROOT), "RECEIVER_TEST_CWD": str(tmp_path)})
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "receiver", "serve", "--emulator", "--emulator-port", str(emulator_port)],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        emulator = f"http://127.0.0.1:{emulator_port}"
        # The banner says the service is ready: the emulator knows the webhook from then on.
        wait_for(lambda: b"receiver: serving on" in (tmp_path / "serve.log").read_bytes(), timeout=60, what="the banner")

        # The README's two curl commands.
        requests.post(
            f"{emulator}/_emulator/batches", json={"id": "bat_demo", "items": 1000, "status": "processing"}, timeout=10
        ).raise_for_status()
        requests.post(f"{emulator}/_emulator/batches/bat_demo/complete", json={}, timeout=10).raise_for_status()

        storage = tmp_path / "receiver-data" / "storage"
        manifest = wait_for(lambda: read_manifest(storage, "bat_demo"), timeout=60, what="bat_demo stored")
        expected = requests.get(f"{emulator}/_emulator/batches/bat_demo", timeout=30).json()["results"]
        (results,) = list(storage.glob("results/dt=*/batch_id=bat_demo/results.jsonl"))
        assert hashlib.sha256(results.read_bytes()).hexdigest() == expected["sha256"] == manifest["files"][0]["sha256"]
        assert manifest["files"][0]["lines"] == 1000

        listing = run_cli(env, "ls")
        assert listing.returncode == 0 and b"bat_demo" in listing.stdout and b"stored" in listing.stdout
        cat = run_cli(env, "cat", "bat_demo")
        assert cat.returncode == 0 and cat.stdout == results.read_bytes()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
    output = (tmp_path / "serve.log").read_text(errors="replace")
    assert code == 0, output
    assert "Traceback" not in output, output


# --- start-up, ports, the banner's example, the second shell, restarts -----------------------------


def _serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A newcomer's environment (nothing configured) on free ports, marked so that every process
    `serve` starts can be found again (`_marked_processes`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECEIVER_", "BATCHROUTER_", "DATABASE_URL", "PROMETHEUS_"))}
    env.pop("GUNICORN_CMD_ARGS", None)
    env.update(
        {
            "PORT": str(free_port()),
            "PYTHONPATH": str(ROOT),
            "RECEIVER_TEST_CWD": str(tmp_path),
            "SERVE_TEST_MARK": f"serve-{os.getpid()}-{tmp_path.name}",
            **extra,
        }
    )
    return env


def _marked_processes(env: dict[str, str]) -> list[int]:
    """Processes still running with this test's mark in their environment."""
    mark = f"SERVE_TEST_MARK={env['SERVE_TEST_MARK']}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class _Serve:
    """`receiver serve --emulator` in tmp_path, its stdout and stderr in serve.N.log."""

    def __init__(self, tmp_path: Path, env: dict[str, str], emulator_port: int, n: int = 0, *, terminal: bool = False) -> None:
        self.log_path = tmp_path / f"serve.{n}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "receiver", "serve", "--emulator", "--emulator-port", str(emulator_port)],
            env=env,
            cwd=tmp_path,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            # `terminal`: a process group of its own, signalled whole as a terminal's Ctrl-C does.
            start_new_session=terminal,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_banner(self, timeout: float = 60) -> str:
        return wait_for(
            lambda: "receiver: serving on" in self.output() and self.output(),
            timeout=timeout,
            what="the serving banner",
            interval=0.05,
        )

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code, self.output()


def _listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses something listens on at `port`, from the kernel's own table."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_ctrl_c_on_serve_emulator_is_clean_and_it_listens_on_loopback_only(tmp_path: Path) -> None:
    env = _serve_env(tmp_path)
    serve = _Serve(tmp_path, env, free_port(), terminal=True)
    try:
        banner = serve.wait_banner()
        assert _listening_addresses(int(env["PORT"])) == {"127.0.0.1"}, banner  # not 0.0.0.0 on a laptop
        # One control socket per gunicorn, not the shared ~/.gunicorn/gunicorn.ctl.
        assert re.search(r"Control socket listening at \S*/receiver-gunicorn-\d+\.ctl", banner), banner
        os.killpg(serve.proc.pid, signal.SIGINT)  # the whole foreground group, as Ctrl-C sends it
    finally:
        code, output = serve.stop()
    assert code == 0, output
    assert "Traceback" not in output and "SystemExit" not in output, output
    assert wait_for(lambda: _marked_processes(env) == [], timeout=10, what="no process left")


def test_ctrl_c_on_the_procfiles_gunicorn_is_clean(tmp_path: Path) -> None:
    env = _serve_env(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path}/receiver.db", RECEIVER_STORAGE_URL=str(tmp_path / "storage"))
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "receiver.app:create_app()"],  # the Procfile's web, from the root
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(lambda: _listening(int(env["PORT"])), timeout=60, what="gunicorn", interval=0.1)
            wait_for(lambda: log.read_text().count("Booting worker") == 2, timeout=30, what="both workers")
            time.sleep(1)  # the workers' app loaded (a signal before that is a different story)
            os.killpg(proc.pid, signal.SIGINT)  # worker and master both hear it, as from a terminal
            code = proc.wait(timeout=40)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log.read_text(errors="replace")
    assert code == 0, output
    assert "Traceback" not in output and "SystemExit" not in output, output


def _second_shell(tmp_path: Path, env: dict[str, str], command: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """`command` in a new shell that has only what the README says: the emulator.env file loaded."""
    clean = _serve_env(tmp_path)
    clean.pop("PORT")
    clean["SERVE_TEST_MARK"] = env["SERVE_TEST_MARK"]
    return subprocess.run(
        ["bash", "-c", f"set -a; . receiver-data/emulator.env; set +a; {command}"],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        timeout=kwargs.pop("timeout", 120),
        **kwargs,
    )


def test_banner_follows_both_servers_and_everything_it_prints_works(tmp_path: Path) -> None:
    env = _serve_env(tmp_path)
    web = f"http://127.0.0.1:{env['PORT']}"
    emulator_port = free_port()
    emulator = f"http://127.0.0.1:{emulator_port}"
    serve = _Serve(tmp_path, env, emulator_port)
    try:
        banner = serve.wait_banner()
        # Once the banner is out, both answer at once: no retry here.
        assert requests.get(f"{web}/healthz", timeout=5).status_code == 200
        assert requests.get(f"{emulator}/healthz", timeout=5).status_code == 200

        # The example curl, exactly as printed.
        (example,) = [line.split(":", 1)[1].strip() for line in banner.splitlines() if "complete a batch:" in line]
        assert example.startswith("curl ")
        made = subprocess.run(["bash", "-c", example], capture_output=True, timeout=60, check=True)
        batch_id = json.loads(made.stdout)["id"]
        storage = tmp_path / "receiver-data" / "storage"
        manifest = wait_for(lambda: read_manifest(storage, batch_id), timeout=60, what=f"{batch_id} stored")
        assert manifest["files"][0]["lines"] == 1000

        # The second shell: the settings file is owner-only, and fetch, register and worker work with it alone.
        env_file = tmp_path / "receiver-data" / "emulator.env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        requests.post(
            f"{emulator}/_emulator/batches", json={"id": "bat_backfill", "items": 10, "status": "completed"}, timeout=10
        ).raise_for_status()
        fetched = _second_shell(tmp_path, env, "python -m receiver fetch bat_backfill")
        assert fetched.returncode == 0, fetched.stderr
        assert read_manifest(storage, "bat_backfill") is not None
        registered = _second_shell(tmp_path, env, f"python -m receiver register --insecure --url {web}/hooks/batchrouter")
        assert registered.returncode == 0, registered.stdout + registered.stderr
        second_worker = subprocess.Popen(
            ["bash", "-c", "set -a; . receiver-data/emulator.env; set +a; exec python -m receiver worker"],
            env={k: v for k, v in env.items() if k != "PORT"},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        # Wait for its first log line (not a fixed sleep: a loaded machine imports slowly), then stop it.
        assert second_worker.stdout is not None
        first_lines = []
        for raw in second_worker.stdout:
            first_lines.append(raw.decode())
            if "started" in first_lines[-1]:
                break
        assert second_worker.poll() is None, "".join(first_lines)
        second_worker.send_signal(signal.SIGTERM)
        worker_output = "".join(first_lines) + second_worker.communicate(timeout=30)[0].decode()
        assert second_worker.returncode == 0 and "started" in worker_output, worker_output

        # A request the emulator logs in colour on a terminal (404): plain text in a file.
        assert requests.get(f"{emulator}/_emulator/batches/bat_nope", timeout=10).status_code == 404

        # The README's DuckDB line, as printed, in the folder serve runs in.
        pytest.importorskip("duckdb")
        duckdb_line = _readme_block_after("<!-- duckdb")
        shown = subprocess.run(
            ["bash", "-c", duckdb_line],
            cwd=tmp_path,
            env={**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"},
            capture_output=True,
            timeout=120,
        )
        assert shown.returncode == 0, shown.stderr
        assert batch_id in shown.stdout.decode() and "1000" in shown.stdout.decode()
    finally:
        code, output = serve.stop()
    assert code == 0, output
    assert "Traceback" not in output, output
    assert "bat_nope" in output and "\x1b[" not in output, output
    assert output.count("receiver: serving on") == 1


def _readme_block_after(marker: str) -> str:
    """The one command in the fenced block that follows `marker` in the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(marker) :]
    block = after.split("```", 2)[1]
    (command,) = [line for line in block.splitlines()[1:] if line.strip()]
    return command


def _serve_until_exit(tmp_path: Path, env: dict[str, str], emulator_port: int) -> subprocess.CompletedProcess[bytes]:
    """`receiver serve --emulator` expected to give up on its own during start-up."""
    command = [sys.executable, "-m", "receiver", "serve", "--emulator", "--emulator-port", str(emulator_port)]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, timeout=90)


@pytest.mark.parametrize("taken", ["PORT", "--emulator-port"])
def test_a_port_in_use_is_one_line_exit_2_and_nothing_starts(tmp_path: Path, taken: str) -> None:
    env = _serve_env(tmp_path)
    emulator_port = free_port()
    port = int(env["PORT"]) if taken == "PORT" else emulator_port
    other = emulator_port if taken == "PORT" else int(env["PORT"])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = _serve_until_exit(tmp_path, env, emulator_port)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert str(port) in stderr and taken in stderr and "Traceback" not in stderr
    assert "serving on" not in stderr + result.stdout.decode()
    assert not _listening(other)
    assert _marked_processes(env) == []


def test_serve_without_an_api_key_is_one_line_exit_2_and_nothing_starts(tmp_path: Path) -> None:
    env = _serve_env(tmp_path)
    result = subprocess.run([sys.executable, "-m", "receiver", "serve"], env=env, cwd=tmp_path, capture_output=True, timeout=60)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "BATCHROUTER_API_KEY" in stderr and "--emulator" in stderr
    assert "serving on" not in stderr and not _listening(int(env["PORT"]))
    assert _marked_processes(env) == []


def test_a_start_up_failure_prints_no_banner_and_stops_everything(tmp_path: Path) -> None:
    # The issue's own failure: gunicorn cannot load its worker class and exits while the rest is up.
    env = _serve_env(tmp_path, GUNICORN_CMD_ARGS="--worker-class receiver.no_such_module.Worker")
    emulator_port = free_port()
    result = _serve_until_exit(tmp_path, env, emulator_port)
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 1, output
    assert "serving on" not in output
    assert "receiver: gunicorn exited" in output
    assert not _listening(emulator_port) and not _listening(int(env["PORT"]))
    assert wait_for(lambda: _marked_processes(env) == [], timeout=10, what="no process left")


def test_serve_again_and_again_keeps_one_signing_secret(tmp_path: Path) -> None:
    env = _serve_env(tmp_path)
    for n in range(3):
        emulator_port = free_port()
        serve = _Serve(tmp_path, env, emulator_port, n)
        try:
            serve.wait_banner()
            if n == 2:  # the emulator of a later run signs with the secret the web side accepts
                requests.post(
                    f"http://127.0.0.1:{emulator_port}/_emulator/batches",
                    json={"id": "bat_third", "items": 5, "status": "completed", "deliver": True},
                    timeout=10,
                ).raise_for_status()
                wait_for(
                    lambda: read_manifest(tmp_path / "receiver-data" / "storage", "bat_third"),
                    timeout=60,
                    what="bat_third stored",
                )
        finally:
            code, output = serve.stop()
        assert code == 0, output
    status = run_cli(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert len(json.loads(status.stdout)["secrets"]["stored"]) == 1

"""The README's first command, as a newcomer runs it: `receiver serve --emulator` in an empty folder.

Nothing is configured: the ledger, the storage folder, the webhook secret and the emulator's webhook
all come from the embedded defaults, and a batch completed in the emulator lands on disk.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from .conftest import ROOT, free_port, read_manifest, run_cli, wait_for, wait_http


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
        wait_http(f"{emulator}/healthz", proc, timeout=30)
        wait_http(f"http://127.0.0.1:{web_port}/readyz", proc, timeout=30)

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

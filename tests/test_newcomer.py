"""What a newcomer reads when something is not right: `cat` of a dead batch, `ls` of a long failure
reason, and the emulator's own help and log."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from receiver.emulator import EmulatorConfig, start_in_thread, stop
from receiver.ledger import Ledger
from receiver.storage import Storage, storage_from_url

from ._stored import store_batch
from .conftest import ROOT, free_port, make_receiver_env, run_cli


def open_storage_at(env: dict[str, str]) -> Storage:
    return storage_from_url(env["RECEIVER_STORAGE_URL"])


# Long, with no break near column 80, so that a cut at a fixed width would land mid-word.
REASON = (
    "AccessDenied: s3://customer-bucket/batchrouter refused s3:PutObject on "
    "results/dt=2026-12-03/batch_id=bat_dead/results.jsonl for the role receiver-prod-writer; "
    "grant it in the bucket policy"
)


def _dead_batch(env: dict[str, str], batch_id: str) -> None:
    """A job that failed for good, as the worker leaves it after its last attempt."""
    ledger = Ledger(env["DATABASE_URL"])
    ledger.create_schema()
    ledger.enqueue(batch_id, origin="fetch")
    job = ledger.claim("test-owner", 30, batch_id=batch_id)
    assert job is not None
    assert ledger.mark_failed(batch_id, "test-owner", REASON, retry_at=None) == "dead"
    ledger.close()


def test_cat_of_a_dead_batch_says_it_is_dead_and_why(tmp_path: Path) -> None:
    env = make_receiver_env(tmp_path, "http://127.0.0.1:9")
    _dead_batch(env, "bat_dead")
    result = run_cli(env, "cat", "bat_dead")
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert result.stdout == b""
    assert "dead" in stderr and REASON in stderr and "Traceback" not in stderr

    unknown = run_cli(env, "cat", "bat_never_heard_of")
    assert unknown.returncode == 1 and b"not stored" in unknown.stderr and b"not heard of" in unknown.stderr


def test_ls_shows_a_failure_reason_whole(tmp_path: Path) -> None:
    env = make_receiver_env(tmp_path, "http://127.0.0.1:9", COLUMNS="80")
    _dead_batch(env, "bat_dead")
    result = run_cli(env, "ls")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("bat_dead "))
    assert lines[row].split()[1] == "dead"
    note = [line.strip() for line in lines[row + 1 :] if line.startswith(" ")]
    assert note[0].startswith("note: ")
    assert " ".join(note).removeprefix("note: ") == REASON  # every word, none cut
    assert all(len(line) <= 80 for line in lines[row + 1 :] if " " in line.strip())


def test_emulator_help_names_the_receiver_command() -> None:
    result = run_cli(dict(os.environ), "emulator", "--help")
    assert result.returncode == 0
    assert result.stdout.decode().startswith("usage: receiver emulator ")


def test_emulator_log_has_no_colour_codes_off_a_terminal() -> None:
    # Read at the logger, before any stream: where colorama is installed its stream wrapper strips
    # the codes from a non-terminal, which hid them on machines with the dev extra installed.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("werkzeug")
    level = logger.level  # other tests quieten werkzeug (tests/_httpservers.py)
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    server, url = start_in_thread(EmulatorConfig(port=0), quiet=False)
    try:
        # 404 and 401 are requests werkzeug colours (yellow, bold red) on a terminal.
        assert requests.get(f"{url}/_emulator/batches/bat_nope", timeout=10).status_code == 404
        assert requests.get(f"{url}/v1/batches/bat_nope", timeout=10).status_code == 401
    finally:
        stop(server)
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [record.getMessage() for record in records]
    assert any("/_emulator/batches/bat_nope" in line for line in lines), lines
    assert any("/v1/batches/bat_nope" in line for line in lines), lines
    assert not any("\x1b[" in line for line in lines), lines


# --- the wrong folder, a missing driver, a bad .env ------------------------------------------------


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A shell with nothing configured, in tmp_path (the embedded defaults apply)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECEIVER_", "BATCHROUTER_", "DATABASE_URL"))}
    env.update({"RECEIVER_TEST_CWD": str(tmp_path), **extra})
    return env


def test_commands_that_only_read_never_create_a_ledger(tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    for args in (["ls"], ["status"], ["cat", "bat_x"], ["ls", "--json"], ["wait", "bat_x"]):
        result = run_cli(env, *args, timeout=30)
        stderr = result.stderr.decode()
        assert result.returncode == 2, (args, stderr)
        assert stderr.count("\n") == 1 and "Traceback" not in stderr
        assert f"no ledger at {tmp_path}/receiver-data/receiver.db" in stderr
        assert "receiver serve" in stderr and "receiver-data/emulator.env" in stderr
        assert result.stdout == b""  # no "no batches yet", no "every delivery gets 401"
    assert not (tmp_path / "receiver-data").exists()


def test_a_postgresql_url_without_psycopg_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    # A test harness, not a mock of our code: this interpreter simply has no psycopg to import.
    shim = tmp_path / "no-psycopg"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['psycopg'] = None  # as if never installed\n")
    env = _clean_env(tmp_path, DATABASE_URL="postgresql://receiver@127.0.0.1:9/receiver", PYTHONPATH=str(shim))
    for args in (["ls"], ["status"], ["worker"], ["fetch", "bat_x"], ["db", "upgrade"]):
        result = run_cli(env, *args, timeout=30)
        lines = result.stderr.decode().strip().splitlines()
        assert result.returncode == 2, (args, lines)
        assert len(lines) == 1 and "pip install 'batchrouter-receiver[postgres]'" in lines[0], (args, lines)
    gunicorn = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "python:receiver.web.gunicorn_conf", "receiver.app:create_app()"],
        env={**env, "PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)]), "PORT": str(free_port())},
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
    )
    lines = gunicorn.stderr.decode().strip().splitlines()
    assert gunicorn.returncode == 2 and len(lines) == 1 and "batchrouter-receiver[postgres]" in lines[0], lines


def test_a_bad_value_from_dotenv_says_it_came_from_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("RECEIVER_WORKER_CONCURRENCY=many\n")
    result = run_cli(_clean_env(tmp_path), "status")
    assert result.returncode == 2
    assert "RECEIVER_WORKER_CONCURRENCY" in result.stderr.decode() and "(set in .env)" in result.stderr.decode()
    # The environment wins over .env, and then the environment is what to fix.
    result = run_cli(_clean_env(tmp_path, RECEIVER_WORKER_CONCURRENCY="lots"), "status")
    assert result.returncode == 2 and "'lots'" in result.stderr.decode() and ".env" not in result.stderr.decode()


# --- `receiver ls`: recent by default, every one on request ----------------------------------------


def test_ls_shows_the_most_recent_by_default_and_every_one_with_all(tmp_path: Path) -> None:
    env = make_receiver_env(tmp_path, "http://127.0.0.1:9")
    ledger = Ledger(env["DATABASE_URL"])
    ledger.create_schema()
    for i in range(60):
        ledger.enqueue(f"bat_{i:03d}", origin="fetch")
        time.sleep(0.002)  # distinct updated_at, so "most recent" is one order
    ledger.close()
    store_batch(open_storage_at(env), "bat_only_in_storage")  # its job is not in this ledger

    table = run_cli(env, "ls")
    lines = table.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines[1:]] == [f"bat_{i:03d}" for i in range(59, 9, -1)]
    assert "--all" in table.stderr.decode()

    few = json.loads(run_cli(env, "ls", "--json", "--limit", "3").stdout)
    assert [r["batch_id"] for r in few] == ["bat_059", "bat_058", "bat_057"]

    every = json.loads(run_cli(env, "ls", "--json", "--all").stdout)
    assert len(every) == 61 and "bat_only_in_storage" in {r["batch_id"] for r in every}

    future = run_cli(env, "ls", "--since", "2999-01-01")
    assert future.returncode == 0 and b"no batch changed since 2999-01-01" in future.stdout
    assert run_cli(env, "ls", "--since", "yesterday").returncode == 2


def test_ls_calls_a_batch_that_ended_without_results_failed(tmp_path: Path) -> None:
    env = make_receiver_env(tmp_path, "http://127.0.0.1:9")
    manifest = store_batch(open_storage_at(env), "bat_failed", status="failed")
    ledger = Ledger(env["DATABASE_URL"])
    ledger.create_schema()
    ledger.enqueue("bat_failed", origin="fetch")
    assert ledger.claim("test-owner", 30, batch_id="bat_failed") is not None
    assert ledger.mark_stored("bat_failed", "test-owner", manifest)
    ledger.close()
    table = run_cli(env, "ls").stdout.decode().splitlines()
    assert table[1].split()[:3] == ["bat_failed", "failed", "failed"]
    [row] = json.loads(run_cli(env, "ls", "--json").stdout)
    assert (row["state"], row["job_state"]) == ("failed", "stored")


def test_setting_messages_say_what_is_allowed_and_where_to_look(tmp_path: Path) -> None:
    def one_line(env: dict[str, str], *args: str) -> str:
        result = run_cli(env, *args, timeout=30)
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.decode().strip().splitlines()
        return line

    assert "receiver-data/emulator.env" in one_line(_clean_env(tmp_path), "fetch", "bat_x")
    assert "http:// on loopback" in one_line(_clean_env(tmp_path, BATCHROUTER_API_URL="ftp://api.example.com"), "status")
    no_secret = _clean_env(tmp_path, RECEIVER_NOTIFY_URL="http://127.0.0.1:9/hook")
    assert "16 or more random bytes" in one_line(no_secret, "status")  # as the README says, not 24+

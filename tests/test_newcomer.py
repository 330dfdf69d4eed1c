"""What a newcomer reads when something is not right: `cat` of a dead batch, `ls` of a long failure
reason, and the emulator's own help and log."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import requests

from receiver.emulator import EmulatorConfig, start_in_thread, stop
from receiver.ledger import Ledger

from .conftest import make_receiver_env, run_cli

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

"""`receiver wait`: exit codes and one line per batch, from the ledger and storage or storage alone;
on a folder and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver.ledger import Ledger
from receiver.storage import storage_from_url

from ._stored import store_batch
from .conftest import S3_SERVERS, make_receiver_env, run_cli


def _env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    return make_receiver_env(tmp_path, "http://127.0.0.1:9", **overrides)


@pytest.fixture(params=["local", S3_SERVERS[1]])  # moto adds nothing here that SeaweedFS does not show
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The CLI's environment, storing in a folder or in a new bucket of the S3 server (whose
    credentials are in os.environ for the test too, for the tests' own writes)."""
    if request.param == "local":
        yield _env(tmp_path)
        return
    endpoint = request.getfixturevalue(f"{request.param}_s3")
    bucket = endpoint.new_bucket("wait")
    with endpoint.environment(AWS_ENDPOINT_URL_S3=endpoint.url):
        yield _env(tmp_path, RECEIVER_STORAGE_URL=f"s3://{bucket}/tenant/prod")


def _ledger(env: dict[str, str]) -> Ledger:
    ledger = Ledger(env["DATABASE_URL"])
    ledger.create_schema()
    return ledger


def _lines(out: bytes) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.decode().splitlines())


def test_stored_batches_exit_0(env: dict[str, str]) -> None:
    storage = storage_from_url(env["RECEIVER_STORAGE_URL"])
    store_batch(storage, "b_1", 3)
    store_batch(storage, "b_2", 4, compress=True)
    out = run_cli(env, "wait", "b_1", "b_2", "--timeout", "10")
    assert out.returncode == 0, out.stderr
    lines = _lines(out.stdout)
    assert lines["b_1"].startswith("stored (completed), 3 lines") and lines["b_2"].startswith("stored (completed), 4 lines")


def test_waits_until_the_manifest_appears(env: dict[str, str]) -> None:
    storage = storage_from_url(env["RECEIVER_STORAGE_URL"])
    _ledger(env).enqueue("b_late")
    timer = threading.Timer(1.5, lambda: store_batch(storage, "b_late", 2))
    timer.start()
    started = time.monotonic()
    out = run_cli(env, "wait", "b_late", "--interval", "0.2")
    timer.join()
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started >= 1.5
    assert _lines(out.stdout)["b_late"].startswith("stored")


def test_failed_dead_unknown_and_timed_out_batches_exit_1(env: dict[str, str]) -> None:
    storage = storage_from_url(env["RECEIVER_STORAGE_URL"])
    store_batch(storage, "b_ok", 1)
    store_batch(storage, "b_failed", status="failed")
    ledger = _ledger(env)
    ledger.enqueue("b_dead")
    assert ledger.claim("w", 30, batch_id="b_dead") is not None
    ledger.mark_failed("b_dead", "w", "PermissionDenied: no access", retry_at=None)
    ledger.enqueue("b_queued")
    out = run_cli(env, "wait", "b_ok", "b_failed", "b_dead", "b_queued", "b_unknown", "--timeout", "1")
    assert out.returncode == 1
    lines = _lines(out.stdout)
    assert lines["b_ok"].startswith("stored")
    assert lines["b_failed"] == "ended failed without results"
    assert lines["b_dead"] == "dead after 1 attempts: PermissionDenied: no access"
    assert lines["b_queued"] == "timed out after 1s: no manifest yet; job queued"
    assert lines["b_unknown"] == "timed out after 1s: no manifest yet; not known to this receiver's ledger"
    assert b"4 of 5 batches without results" in out.stderr


def test_storage_alone_is_enough_and_no_ledger_is_created(env: dict[str, str], tmp_path: Path) -> None:
    env = dict(env, DATABASE_URL=f"sqlite:///{tmp_path}/absent/receiver.db")
    store_batch(storage_from_url(env["RECEIVER_STORAGE_URL"]), "b_1", 2)
    out = run_cli(env, "wait", "b_1", "b_2", "--timeout", "0.5")
    assert out.returncode == 1
    lines = _lines(out.stdout)
    assert lines["b_1"].startswith("stored") and lines["b_2"] == "timed out after 0.5s: no manifest yet"
    assert not (tmp_path / "absent" / "receiver.db").exists()


def test_an_unsafe_batch_id_is_a_usage_error(tmp_path: Path) -> None:
    assert run_cli(_env(tmp_path), "wait", "../etc").returncode == 2

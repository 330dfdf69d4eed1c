"""Never miss a batch: the polling fallback and `receiver watch`, against the emulator over HTTP.

The emulator completes a batch without sending its terminal delivery (`deliver: false`), which is
what a lost delivery looks like from here; polls are counted on its API counters.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import Service, make_receiver_env, run_cli, wait_for
from .test_pipeline import stored

POLL_SECONDS = "1"


@pytest.fixture
def receiver_env(tmp_path: Path, emulator: Any) -> dict[str, str]:
    return make_receiver_env(tmp_path, emulator.url, RECEIVER_POLL_SECONDS=POLL_SECONDS)


def progress(emulator: Any, batch_id: str, n: int = 1) -> None:
    """A signed `batch.progress` delivery for `batch_id`, through the emulator, answered before return."""
    body = {
        "id": f"evt_progress_{batch_id}_{n}",
        "type": "batch.progress",
        "created": int(time.time()),
        "data": {"batch_id": batch_id, "status": "processing"},
    }
    r = requests.post(f"{emulator.url}/_emulator/deliveries", json={"body": body, "wait": True}, timeout=30)
    r.raise_for_status()
    assert r.json()["attempts"][-1]["status"] == 200, r.json()


def polls(emulator: Any, batch_id: str) -> int:
    return emulator.stats()["api_requests"].get(f"/v1/batches/{batch_id}", 0)


def status_json(env: dict[str, str]) -> dict[str, Any]:
    done = run_cli(env, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_batch_whose_terminal_delivery_is_lost_is_stored_by_polling(emulator, web, worker, secret, receiver_env, tmp_path):
    batch_id = emulator.create_batch(items=40)["id"]
    progress(emulator, batch_id)
    emulator.complete(batch_id, deliver=False)

    manifest = stored(tmp_path, batch_id, timeout=30)
    assert manifest["status"] == "completed" and manifest["event_ids"] == []
    assert manifest["files"][0]["lines"] == 40
    wait_for(lambda: "stored by polling: no terminal delivery arrived" in worker.output(), timeout=10, what="the log line")
    polling = status_json(receiver_env)["polling"]
    assert polling["found_by_poll"] == 1 and polling["polls"] >= 1 and polling["watched"] == 0


def test_deliveries_refused_for_their_signature_are_shown_by_status_and_metrics(emulator, web, secret, receiver_env):
    body = b'{"id": "evt_forged", "type": "batch.completed", "data": {"batch_id": "bat_x"}}'
    r = requests.post(web.hook, data=body, headers={"Content-Type": "application/json", "X-BatchRouter-Signature": "00" * 32})
    assert r.status_code == 401
    text = run_cli(receiver_env, "status").stdout.decode()
    assert "deliveries refused for a bad signature (24h): 1" in text
    assert "warning: deliveries were refused" in text
    assert status_json(receiver_env)["polling"]["refused_signature_24h"] == 1
    scrape = requests.get(f"{web.url}/metrics", timeout=10).text
    assert "receiver_refused_signature_deliveries_24h 1.0" in scrape
    assert "receiver_watched_batches 0.0" in scrape


def test_watch_stores_a_batch_no_delivery_named(emulator, worker, receiver_env, tmp_path):
    running = emulator.create_batch(items=30)["id"]
    ended = emulator.create_batch(items=20, status="completed")["id"]
    done = run_cli(receiver_env, "watch", running, ended)
    assert done.returncode == 0, done.stderr
    assert f"{ended}: completed; queued to be stored now" in done.stdout.decode()
    assert stored(tmp_path, ended, timeout=20)["files"][0]["lines"] == 20
    assert status_json(receiver_env)["polling"]["watched"] == 1

    emulator.complete(running, deliver=False)
    assert stored(tmp_path, running, timeout=30)["files"][0]["lines"] == 30


def test_watch_refuses_a_batch_batchrouter_does_not_know(emulator, receiver_env):
    known = emulator.create_batch(items=5)["id"]
    done = run_cli(receiver_env, "watch", known, "bat_nobody_knows")
    assert done.returncode == 1
    assert "bat_nobody_knows" in done.stderr.decode()
    assert run_cli(receiver_env, "watch", "../escape").returncode == 2
    without_key = {**receiver_env, "BATCHROUTER_API_KEY": ""}
    assert run_cli(without_key, "watch", known).returncode == 2


def test_a_batch_that_ended_while_every_process_was_stopped_is_stored_after_restart(
    emulator, web, secret, receiver_env, tmp_path
):
    batch_id = emulator.create_batch(items=25)["id"]
    progress(emulator, batch_id)
    web.service.stop()
    emulator.complete(batch_id, deliver=False)
    time.sleep(float(POLL_SECONDS) * 2)  # its poll is overdue when the worker starts
    worker = Service("worker", [sys.executable, "-m", "receiver", "worker"], receiver_env, tmp_path).start()
    try:
        assert stored(tmp_path, batch_id, timeout=20)["files"][0]["lines"] == 25
    finally:
        worker.stop()


def test_a_delivery_and_a_poll_racing_store_the_batch_once(emulator, web, worker, secret, tmp_path):
    batch_ids = [emulator.create_batch(items=15 + i)["id"] for i in range(6)]
    for batch_id in batch_ids:
        progress(emulator, batch_id)
    time.sleep(float(POLL_SECONDS))  # polls are due from now on: each delivery races one
    for i, batch_id in enumerate(batch_ids):
        emulator.complete(batch_id)
        time.sleep(0.15 * i)
    for i, batch_id in enumerate(batch_ids):
        assert stored(tmp_path, batch_id, timeout=30)["files"][0]["lines"] == 15 + i
    downloads = emulator.stats()["artifact_requests"]
    assert {b: downloads.get(b) for b in batch_ids} == {b: 1 for b in batch_ids}
    for batch_id in batch_ids:
        assert len(list((tmp_path / "storage").glob(f"results/dt=*/batch_id={batch_id}/*"))) == 1


def test_two_workers_poll_a_batch_about_once_per_interval_in_total(emulator, receiver_env, tmp_path):
    batch_id = emulator.create_batch(items=5)["id"]
    assert run_cli(receiver_env, "watch", batch_id).returncode == 0
    workers = [
        Service(f"worker-{i}", [sys.executable, "-m", "receiver", "worker"], receiver_env, tmp_path).start() for i in range(2)
    ]
    try:
        wait_for(lambda: polls(emulator, batch_id) >= 2, timeout=20, what="the first poll")
        first = polls(emulator, batch_id)
        window = 8 * float(POLL_SECONDS)
        time.sleep(window)
        made = polls(emulator, batch_id) - first
    finally:
        for w in workers:
            w.stop()
    # About one poll per interval (drawn over 0.5-1.5 intervals); each worker on its own would
    # make about twice as many.
    assert window / 3 <= made <= window * 1.4, made


def test_a_404_stops_polling_and_shows_in_ls_and_status(emulator, web, worker, secret, receiver_env):
    progress(emulator, "bat_vanished")  # signed, but BatchRouter does not know the batch
    wait_for(lambda: polls(emulator, "bat_vanished") >= 1, timeout=20, what="the first poll")
    time.sleep(3 * float(POLL_SECONDS))
    assert polls(emulator, "bat_vanished") == 1
    listed = json.loads(run_cli(receiver_env, "ls", "--json").stdout)
    assert [(r["state"], r["batch_status"]) for r in listed if r["batch_id"] == "bat_vanished"] == [
        ("not_found", "404 not found")
    ]
    assert status_json(receiver_env)["polling"]["not_found"] == 1
    assert "not found by BatchRouter: 1" in run_cli(receiver_env, "status").stdout.decode()


def test_a_429_pauses_polling_for_its_retry_after(emulator, worker, receiver_env, tmp_path):
    batch_id = emulator.create_batch(items=10)["id"]
    assert run_cli(receiver_env, "watch", batch_id).returncode == 0
    # Retry-After well above the look below, so a loaded machine that notices the 429 late still
    # looks inside the pause (with 1 s polls there would be two or three more polls without it).
    emulator.fault(target="api", kind="429", retry_after=8, batch_id=batch_id)
    wait_for(lambda: polls(emulator, batch_id) >= 2, timeout=20, what="the rate-limited poll")
    time.sleep(2.5)
    assert polls(emulator, batch_id) == 2
    wait_for(lambda: polls(emulator, batch_id) >= 3, timeout=15, what="the poll after Retry-After")
    assert "rate-limits us (429)" in worker.output()
    emulator.complete(batch_id, deliver=False)
    assert stored(tmp_path, batch_id, timeout=20)["files"][0]["lines"] == 10

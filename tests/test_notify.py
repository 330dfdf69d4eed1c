"""Downstream notifications: signed `batch.stored` events from the outbox, retried through a failing
and vanishing consumer, across a SIGKILLed worker and between racing workers.

The consumer is a real HTTP server on loopback; signatures are checked with the independent
`standardwebhooks` package (PyPI), not with our own signing code.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from receiver.config import NotifySettings, Settings, WorkerSettings
from receiver.jobs.notifier import Notifier
from receiver.ledger import Ledger
from receiver.manifest import Manifest, StoredFile
from receiver.metrics import render

from ._sink import SECRET, Received, Sink, verify
from .conftest import Service, make_receiver_env, read_manifest, run_cli, wait_for


@pytest.fixture
def sink() -> Any:
    s = Sink().up()
    yield s
    s.down()


def _manifest(batch_id: str) -> Manifest:
    key = f"results/dt=2026-01-02/batch_id={batch_id}/results.jsonl"
    return Manifest(
        batch_id,
        "completed",
        (StoredFile(key, 10, "ab" * 32, 2),),
        dt.datetime.now(dt.UTC),
        ("evt_1",),
        "artifact",
        2,
        {"id": batch_id},
    )


def _stored_ledger(tmp_path: Path, *batch_ids: str, url: str | None = None) -> Ledger:
    """A ledger (SQLite file unless `url`) where each batch was stored with notifications on."""
    ledger = Ledger(url or f"sqlite:///{tmp_path}/receiver.db")
    ledger.create_schema()
    for batch_id in batch_ids:
        ledger.enqueue(batch_id)
        job = ledger.claim("w", 30, batch_id=batch_id)
        assert job is not None
        assert ledger.mark_stored(batch_id, "w", _manifest(batch_id), notify=True)
    return ledger


def _settings(url: str, **notify: Any) -> Settings:
    """Quick retries and a short lease; `notify` overrides the webhook target's settings."""
    return Settings(
        notify=NotifySettings(url=url, secret=SECRET, **notify),
        worker=WorkerSettings(retry_base_seconds=0.05, retry_cap_seconds=0.2, lease_seconds=2.0),
    )


def _send_until_settled(notifier: Notifier, batch_id: str, timeout: float = 30.0) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        notifier.send_one()
        row = notifier.ledger.notification(batch_id)
        return row if row and row["state"] != "pending" else None

    return wait_for(settled, timeout=timeout, interval=0.05, what=f"{batch_id}'s notification to settle")


# --- the sender, in process, against a real consumer ------------------------------------------------


def test_event_is_the_manifest_signed_the_standard_webhooks_way(tmp_path: Path, sink: Sink) -> None:
    ledger = _stored_ledger(tmp_path, "b_1")
    row = _send_until_settled(Notifier(_settings(sink.url), ledger, "n1"), "b_1")
    assert row["state"] == "sent" and row["attempts"] == 1
    [received] = sink.received
    event = verify(received)
    assert event["type"] == "batch.stored"
    assert event["data"] == _manifest("b_1").to_dict() | {"stored_at": event["data"]["stored_at"]}
    assert dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    assert received.headers["Webhook-Id"] == row["webhook_id"].strip() and row["webhook_id"].startswith("msg_")
    assert abs(int(received.headers["Webhook-Timestamp"]) - time.time()) < 60
    assert "Authorization" not in received.headers


def test_failures_and_an_outage_are_retried_with_one_webhook_id(tmp_path: Path) -> None:
    sink = Sink()
    sink.statuses.extend([503, 500, 429])
    sink.up()
    ledger = _stored_ledger(tmp_path, "b_1")
    notifier = Notifier(_settings(sink.url), ledger, "n1")
    wait_for(lambda: notifier.send_one() and len(sink.received) >= 3, timeout=20, interval=0.05, what="three refusals")
    sink.down()  # the consumer vanishes: connection refused
    time.sleep(0.3)
    assert notifier.send_one()
    row = ledger.notification("b_1")
    assert row is not None and row["state"] == "pending" and "Connection" in (row["last_error"] or "")
    sink.up()  # and comes back
    row = _send_until_settled(notifier, "b_1")
    assert row["state"] == "sent"
    assert [r.status for r in sink.received] == [503, 500, 429, 200]
    assert {r.headers["Webhook-Id"] for r in sink.received} == {row["webhook_id"]}
    for received in sink.received:
        verify(received)  # every attempt freshly signed
    sink.down()


def test_an_event_fails_for_good_after_its_retry_window_and_status_shows_it(tmp_path: Path, sink: Sink) -> None:
    sink.statuses.extend([500] * 100)
    ledger = _stored_ledger(tmp_path, "b_1")
    row = _send_until_settled(Notifier(_settings(sink.url, retry_seconds=0.5), ledger, "n1"), "b_1")
    assert row["state"] == "failed" and row["last_error"] == "HTTP 500"
    assert b'receiver_notifications_failed{target="webhook"} 1.0' in render(ledger.stats)
    assert b'receiver_notifications_pending{target="webhook"} 0.0' in render(ledger.stats)
    env = make_receiver_env(tmp_path, "http://127.0.0.1:9", RECEIVER_NOTIFY_URL=sink.url, RECEIVER_NOTIFY_SECRET=SECRET)
    out = run_cli(env, "status")
    assert out.returncode == 0, out.stderr
    assert "failed 1" in out.stdout.decode() and "notification failed: b_1" in out.stdout.decode()
    assert SECRET not in out.stdout.decode()

    # `notify --replay` queues it again, with the same webhook-id and a fresh window.
    sink.statuses.clear()
    out = run_cli(env, "notify", "--replay", "b_1")
    assert out.returncode == 0, out.stderr
    assert row["webhook_id"] in out.stdout.decode()
    again = _send_until_settled(Notifier(_settings(sink.url), ledger, "n2"), "b_1")
    assert again["state"] == "sent"
    assert sink.delivered()[-1].headers["Webhook-Id"] == row["webhook_id"]


def test_replay_of_a_batch_stored_before_notifications_builds_its_event(tmp_path: Path, sink: Sink) -> None:
    from receiver.storage import storage_from_url

    from ._stored import store_batch

    store_batch(storage_from_url(str(tmp_path / "storage")), "b_old", 5)
    env = make_receiver_env(tmp_path, "http://127.0.0.1:9", RECEIVER_NOTIFY_URL=sink.url, RECEIVER_NOTIFY_SECRET=SECRET)
    assert run_cli(env, "notify", "--replay", "b_old").returncode == 0
    out = run_cli(env, "notify", "--replay", "b_unknown")
    assert out.returncode == 1 and b"b_unknown" in out.stderr
    ledger = Ledger(env["DATABASE_URL"])
    _send_until_settled(Notifier(_settings(sink.url), ledger, "n1"), "b_old")
    assert verify(sink.delivered()[0])["data"]["batch_id"] == "b_old"


def test_racing_senders_claim_each_event_once(tmp_path: Path, db_url: str) -> None:
    ids = [f"b_{i}" for i in range(40)]
    ledger = _stored_ledger(tmp_path, *ids, url=db_url)
    claimed: list[str] = []

    def sender(owner: str) -> None:
        other = Ledger(ledger.url)
        while (event := other.claim_notification(owner, 60)) is not None:
            claimed.append(event.batch_id)
        other.close()

    threads = [threading.Thread(target=sender, args=(f"s{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)
    ledger.close()


@pytest.mark.parametrize(
    "env, problem",
    [
        ({"RECEIVER_NOTIFY_URL": "https://jobs.example.com/hooks"}, "RECEIVER_NOTIFY_SECRET: is required"),
        ({"RECEIVER_NOTIFY_URL": "https://jobs.example.com/hooks", "RECEIVER_NOTIFY_SECRET": "hunter2hunter2"}, "whsec_"),
        ({"RECEIVER_NOTIFY_URL": "http://jobs.internal/hooks", "RECEIVER_NOTIFY_SECRET": SECRET}, "RECEIVER_NOTIFY_HOSTS"),
        ({"RECEIVER_NOTIFY_URL": "ftp://jobs.example.com/", "RECEIVER_NOTIFY_SECRET": SECRET}, "https://"),
    ],
)
def test_bad_notify_settings_stop_with_one_line(tmp_path: Path, env: dict[str, str], problem: str) -> None:
    out = run_cli(make_receiver_env(tmp_path, "http://127.0.0.1:9", **env), "worker", timeout=30)
    assert out.returncode == 2
    assert problem in out.stderr.decode() and len(out.stderr.decode().strip().splitlines()) == 1
    assert env.get("RECEIVER_NOTIFY_SECRET", "\0") not in out.stderr.decode()


def test_plain_http_to_a_listed_private_host_is_allowed() -> None:
    settings = Settings.from_mapping(
        {
            "RECEIVER_NOTIFY_URL": "http://jobs.internal:8080/hooks",
            "RECEIVER_NOTIFY_SECRET": SECRET,
            "RECEIVER_NOTIFY_HOSTS": "jobs.internal",
        }
    )
    assert settings.notify.url == "http://jobs.internal:8080/hooks"
    assert SECRET not in repr(settings)


# --- the worker, as processes, with the emulator and gunicorn -----------------------------------------


def _notify_env(receiver_env: dict[str, str], url: str) -> dict[str, str]:
    return {**receiver_env, "RECEIVER_NOTIFY_URL": url, "RECEIVER_NOTIFY_SECRET": SECRET}


def test_worker_killed_before_sending_announces_after_restart(emulator, web, secret, receiver_env, tmp_path) -> None:
    sink = Sink()  # not up yet: the consumer is down while the batch is stored
    env = _notify_env(receiver_env, sink.url)
    worker = Service("worker", [sys.executable, "-m", "receiver", "worker"], env, tmp_path).start()
    batch_id = emulator.create_batch(items=200, status="processing")["id"]
    emulator.complete(batch_id)
    wait_for(lambda: read_manifest(tmp_path / "storage", batch_id), timeout=60, what="the manifest")
    ledger = Ledger(env["DATABASE_URL"])
    before = wait_for(
        lambda: (row := ledger.notification(batch_id)) and row["attempts"] >= 1 and row["lease_owner"] is None and row,
        timeout=30,
        what="a failed first attempt",
    )
    worker.kill()  # SIGKILL: nothing is given back, nothing flushed
    sink.up()
    worker = Service("worker2", [sys.executable, "-m", "receiver", "worker"], env, tmp_path).start()
    try:
        wait_for(lambda: sink.delivered(), timeout=60, what="the event after the restart")
    finally:
        worker.stop()
        sink.down()
    [received] = sink.delivered()
    assert received.headers["Webhook-Id"] == before["webhook_id"]
    event = verify(received)
    assert event["data"] == read_manifest(tmp_path / "storage", batch_id)
    assert ledger.notification(batch_id)["state"] == "sent"


def test_two_workers_send_each_event_once_at_a_time(emulator, web, secret, receiver_env, tmp_path) -> None:
    sink = Sink(delay=0.3)
    sink.statuses.extend([500, 500, 500])
    sink.up()
    env = _notify_env(receiver_env, sink.url)
    workers = [Service(f"worker{i}", [sys.executable, "-m", "receiver", "worker"], env, tmp_path).start() for i in range(2)]
    batch_ids = [emulator.create_batch(items=20, status="processing")["id"] for _ in range(6)]
    try:
        for batch_id in batch_ids:
            emulator.complete(batch_id)
        wait_for(
            lambda: {verify(r)["data"]["batch_id"] for r in sink.delivered()} >= set(batch_ids),
            timeout=90,
            what="every batch announced",
        )
    finally:
        for w in workers:
            w.stop()
        sink.down()
    by_batch: dict[str, list[Received]] = {}
    for received in sink.received:
        by_batch.setdefault(json.loads(received.body)["data"]["batch_id"], []).append(received)
    for batch_id, attempts in by_batch.items():
        assert len({r.headers["Webhook-Id"] for r in attempts}) == 1, batch_id
        spans = sorted((r.started, r.ended) for r in attempts)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), f"{batch_id} sent twice at once"
    status = run_cli(env, "status").stdout.decode()
    assert "notifications: pending 0  sent 6  failed 0" in status

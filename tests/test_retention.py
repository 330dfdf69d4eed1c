"""Retention end to end: `receiver db stats` and `db prune` as a user runs them, and a late delivery
for a batch whose ledger rows were pruned, which must store nothing twice and download nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import requests
import sqlalchemy as sa

from receiver.ledger import STORED, Delivery, Ledger
from receiver.ledger.schema import deliveries, jobs, known_batches
from receiver.signature import sign

from .conftest import make_receiver_env, read_manifest, run_cli, wait_for

DAY = 86400.0


def _age_everything(database_url: str, days: float) -> None:
    """Move every row's timestamps `days` into the past, as time passing would (set-up only)."""
    ago = time.time() - days * DAY
    ledger = Ledger(database_url)
    with ledger.engine.begin() as conn:
        conn.execute(deliveries.update().values(received_at=ago))
        conn.execute(jobs.update().values(created_at=ago, updated_at=ago))
        conn.execute(known_batches.update().values(first_seen_at=ago))
    ledger.close()


def test_a_late_delivery_of_a_pruned_batch_downloads_nothing_and_stores_nothing_twice(
    emulator, web, worker, secret, receiver_env, tmp_path
):
    batch_id = emulator.create_batch(items=300, status="processing")["id"]
    body = emulator.complete(batch_id, deliver=False)["body"].encode()
    headers = {"Content-Type": "application/json", "X-BatchRouter-Signature": sign(secret, body)}
    assert requests.post(web.hook, data=body, headers=headers, timeout=30).json()["status"] == "accepted"
    manifest_path = tmp_path / "storage" / "manifests" / f"{batch_id}.json"
    wait_for(lambda: read_manifest(tmp_path / "storage", batch_id), what="the batch stored")
    ledger = Ledger(receiver_env["DATABASE_URL"])
    wait_for(lambda: (ledger.job(batch_id) or {}).get("state") == STORED, what="the job marked stored")
    first_manifest = manifest_path.read_bytes()
    assert emulator.stats()["artifact_requests"][batch_id] == 1

    _age_everything(receiver_env["DATABASE_URL"], 100)
    pruned = run_cli(receiver_env, "db", "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "stored jobs: removed 1" in pruned.stdout.decode() and "deliveries: removed 1" in pruned.stdout.decode()
    assert ledger.job(batch_id) is None and not ledger.has_delivery(json.loads(body)["id"])

    # BatchRouter (or anyone with the signed body) delivers it again: the ledger has forgotten it.
    assert requests.post(web.hook, data=body, headers=headers, timeout=30).json()["status"] == "accepted"
    wait_for(lambda: (ledger.job(batch_id) or {}).get("state") == STORED, what="the manifest adopted")
    ledger.close()
    assert emulator.stats()["artifact_requests"][batch_id] == 1  # not downloaded again
    assert manifest_path.read_bytes() == first_manifest  # the record in storage is untouched
    results = [p for p in (tmp_path / "storage").rglob("*") if p.is_file() and p.name.startswith("results")]
    assert len(results) == 1
    assert list((tmp_path / "storage" / ".partial").iterdir()) == []


def test_db_stats_and_prune_report_and_remove_what_is_past_retention(tmp_path: Path):
    env = make_receiver_env(tmp_path, "http://127.0.0.1:9")
    ledger = Ledger(env["DATABASE_URL"])
    ledger.create_schema()
    for i in range(30):
        ledger.record_delivery(Delivery(f"evt_{i}", "batch.progress", f"bat_{i}", "processing", terminal=False))
    _age_everything(env["DATABASE_URL"], 20)  # past the deliveries' 14 days, not a job's 90
    ledger.record_delivery(Delivery("evt_new", "batch.progress", "bat_new", "processing", terminal=False))

    stats = run_cli(env, "db", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    found = json.loads(stats.stdout)
    tables = {t["table"]: t for t in found["tables"]}
    assert tables["deliveries"]["rows"] == 31 and tables["deliveries"]["bytes"] > 0
    assert tables["known_batches"]["rows"] == 31
    removable = {r["rule"]: r for r in found["retention"]}
    assert removable["deliveries"] == {
        "rule": "deliveries",
        "setting": "RECEIVER_DELIVERY_RETENTION_DAYS",
        "days": 14,
        "removable": 30,
    }
    assert removable["known batches"]["removable"] == 0  # still watched: polling needs them
    text = run_cli(env, "db", "stats")
    assert text.returncode == 0 and b"deliveries" in text.stdout and b"RECEIVER_JOB_RETENTION_DAYS" in text.stdout

    dry = run_cli(env, "db", "prune", "--dry-run")
    assert dry.returncode == 0 and "deliveries: would remove 30" in dry.stdout.decode()
    assert ledger.has_delivery("evt_0")
    done = run_cli(env, "db", "prune")
    assert done.returncode == 0 and "deliveries: removed 30" in done.stdout.decode()
    assert not ledger.has_delivery("evt_0") and ledger.has_delivery("evt_new")
    again = run_cli(env, "db", "prune", "--dry-run")
    assert "deliveries: would remove 0" in again.stdout.decode()
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(known_batches)).scalar_one() == 31
    ledger.close()

    for name, value in [("RECEIVER_JOB_RETENTION_DAYS", "3"), ("RECEIVER_NOTIFICATION_RETENTION_DAYS", "a week")]:
        bad = run_cli(dict(env, **{name: value}), "db", "prune")
        lines = bad.stderr.decode().strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and name in lines[0], bad.stderr


def test_housekeeping_prunes_a_backlog_in_steps_while_jobs_are_claimed(tmp_path: Path):
    """The duty prunes on its own thread in small steps with pauses: a claim made while it runs
    goes through while rows remain to prune (an ordering, not a timing), and the round ends with
    nothing past retention."""
    from receiver.config import RetentionSettings, Settings
    from receiver.jobs.housekeeping import Housekeeping
    from receiver.storage.local import LocalStorage

    url = f"sqlite:///{tmp_path}/ledger.db"
    ledger = Ledger(url)
    ledger.create_schema()
    for i in range(300):
        ledger.record_delivery(Delivery(f"evt_{i}", "batch.progress", None, "processing", terminal=False))
    _age_everything(url, 20)
    settings = Settings(database_url=url, storage_url=str(tmp_path / "storage"))
    duty = Housekeeping(settings, ledger, LocalStorage(tmp_path / "storage"), step_rows=10)
    duty.start()
    try:
        ledger.record_delivery(Delivery("evt_done", "batch.completed", "bat_1", "completed", terminal=True))
        assert ledger.claim("w1", 30).batch_id == "bat_1"
        assert ledger.prune_backlog(RetentionSettings())["deliveries"] > 0  # the claim did not wait for the prune
        wait_for(lambda: ledger.prune_backlog(RetentionSettings())["deliveries"] == 0, what="the backlog pruned")
    finally:
        duty.stop()
        duty.join(10)
    assert ledger.has_delivery("evt_done")
    ledger.close()


def test_db_stats_and_prune_make_no_ledger_where_there_is_none(tmp_path: Path):
    env = make_receiver_env(tmp_path, "http://127.0.0.1:9")
    for args in (["db", "stats"], ["db", "prune", "--dry-run"]):
        done = run_cli(env, *args)
        assert done.returncode == 2 and b"no ledger at" in done.stderr, done.stderr
    assert not (tmp_path / "receiver.db").exists()

"""End to end on the embedded defaults: emulator → gunicorn → ledger → worker → local storage."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import time
from pathlib import Path

import pytest
import requests

from receiver.signature import sign

from .conftest import EMULATOR_KEY, read_manifest, run_cli, wait_for


def stored(tmp_path: Path, batch_id: str, timeout: float = 60) -> dict:
    return wait_for(lambda: read_manifest(tmp_path / "storage", batch_id), timeout=timeout, what=f"manifest of {batch_id}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_completed_batch_is_stored_with_matching_bytes(emulator, web, worker, secret, tmp_path):
    batch = emulator.create_batch(items=2500, line_bytes=300, status="processing")
    batch_id = batch["id"]
    sent = emulator.complete(batch_id)
    manifest = stored(tmp_path, batch_id)
    expected = emulator.expected(batch_id)["results"]

    assert manifest["batch_id"] == batch_id
    assert manifest["status"] == "completed"
    assert manifest["source"] == "artifact"
    assert manifest["event_ids"] == [sent["event_id"]]
    assert manifest["expected_items"] == 2500 and manifest["counts_match"] is True
    assert manifest["batch"]["id"] == batch_id
    [entry] = manifest["files"]
    day = manifest["stored_at"][:10]
    assert entry["key"] == f"results/dt={day}/batch_id={batch_id}/results.jsonl"
    path = tmp_path / "storage" / entry["key"]
    assert entry["sha256"] == expected["sha256"] == file_sha256(path)
    assert entry["bytes"] == expected["bytes"] == path.stat().st_size
    assert entry["lines"] == 2500
    # The API key never went to the artifact host.
    assert emulator.stats()["artifact_requests_with_authorization"] == 0


def test_flat_payload_is_stored(emulator, web, worker, secret, tmp_path):
    batch_id = emulator.create_batch(items=50)["id"]
    sent = emulator.complete(batch_id, form="flat")
    manifest = stored(tmp_path, batch_id)
    assert manifest["status"] == "completed"
    assert manifest["event_ids"] == [sent["event_id"]] or manifest["event_ids"][0].startswith("derived_")


@pytest.mark.parametrize("shape,url_key", [("wrapped", "download_url"), ("state", "signed_url")])
def test_documented_api_variants_are_accepted(emulator, web, worker, secret, tmp_path, shape, url_key):
    batch_id = emulator.create_batch(items=20, shape=shape, url_key=url_key)["id"]
    emulator.complete(batch_id)
    assert stored(tmp_path, batch_id)["files"][0]["lines"] == 20


def test_batch_without_a_signed_download_is_stored_from_its_results_pages(emulator, web, worker, secret, tmp_path):
    # 2,500 items: three pages of at most 1,000. A twin batch with a signed download has the same rows.
    batch_id = emulator.create_batch(items=2500, line_bytes=300, error_items=4, artifact_url=False)["id"]
    twin_id = emulator.create_batch(items=2500, line_bytes=300, error_items=4, status="completed")["id"]
    emulator.complete(batch_id)
    manifest = stored(tmp_path, batch_id)

    assert manifest["source"] == "results_pages"
    assert manifest["expected_items"] == 2500 and manifest["counts_match"] is True
    [entry] = manifest["files"]  # no error file: pages carry none
    day = manifest["stored_at"][:10]
    assert entry["key"] == f"results/dt={day}/batch_id={batch_id}/results.jsonl"
    path = tmp_path / "storage" / entry["key"]
    data = path.read_bytes()
    assert entry["lines"] == 2500 and entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    headers = {"Authorization": f"Bearer {EMULATOR_KEY}"}
    url = requests.get(f"{emulator.url}/v1/batches/{twin_id}/artifact-url", headers=headers, timeout=10).json()["url"]
    artifact = requests.get(url, timeout=30).content
    assert [json.loads(line) for line in data.splitlines()] == [json.loads(line) for line in artifact.splitlines()]
    assert emulator.stats()["api_requests"][f"/v1/batches/{batch_id}/results"] == 3
    assert [p.name for p in all_files(tmp_path / "storage") if not p.name.endswith((".jsonl", ".json"))] == []


def test_results_answered_as_raw_jsonl_are_stored_byte_for_byte(emulator, web, worker, secret, tmp_path):
    batch_id = emulator.create_batch(items=1200, line_bytes=250, artifact_url=False, results_form="jsonl")["id"]
    emulator.complete(batch_id)
    manifest = stored(tmp_path, batch_id)
    expected = emulator.expected(batch_id)["results"]
    [entry] = manifest["files"]
    assert manifest["source"] == "results_pages"
    assert (entry["sha256"], entry["bytes"], entry["lines"]) == (expected["sha256"], expected["bytes"], 1200)
    assert file_sha256(tmp_path / "storage" / entry["key"]) == expected["sha256"]
    assert emulator.stats()["api_requests"][f"/v1/batches/{batch_id}/results"] == 1


def test_raw_jsonl_cut_off_mid_stream_is_retried_into_a_whole_file(emulator, web, worker, secret, tmp_path):
    batch_id = emulator.create_batch(items=4000, line_bytes=250, artifact_url=False, results_form="jsonl")["id"]
    # Body faults bite only on a body longer than after_bytes: of the job's API calls, only /results.
    emulator.fault(batch_id=batch_id, target="api", kind="drop", after_bytes=300_000, count=3)
    emulator.complete(batch_id)
    manifest = stored(tmp_path, batch_id)
    [entry] = manifest["files"]
    assert entry["sha256"] == emulator.expected(batch_id)["results"]["sha256"] and entry["lines"] == 4000
    assert emulator.stats()["api_requests"][f"/v1/batches/{batch_id}/results"] == 2
    assert [p.name for p in all_files(tmp_path / "storage") if ".part" in p.name] == []


def test_concurrent_duplicates_store_once_and_download_once(emulator, web, worker, secret, tmp_path):
    batch_id = emulator.create_batch(items=500)["id"]
    sent = emulator.complete(batch_id, deliver=False)
    body = sent["body"].encode()
    headers = {"Content-Type": "application/json", "X-BatchRouter-Signature": sign(secret, body)}
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: requests.post(web.hook, data=body, headers=headers, timeout=30), range(20)))
    assert all(a.status_code == 200 for a in answers)
    outcomes = sorted(a.json()["status"] for a in answers)
    assert outcomes == ["accepted"] + ["duplicate"] * 19
    stored(tmp_path, batch_id)
    time.sleep(1.5)
    assert emulator.stats()["artifact_requests"].get(batch_id) == 1
    results = [p for p in all_files(tmp_path / "storage") if p.name.startswith("results")]
    assert len(results) == 1


def test_bad_or_missing_signature_is_401_and_stores_nothing(emulator, web, worker, secret, tmp_path):
    batch_id = emulator.create_batch(items=5)["id"]
    sent = emulator.complete(batch_id, deliver=False)
    body = sent["body"].encode()
    missing = requests.post(web.hook, data=body, headers={"Content-Type": "application/json"}, timeout=10)
    wrong = requests.post(
        web.hook,
        data=body,
        headers={"Content-Type": "application/json", "X-BatchRouter-Signature": sign("not-the-secret", body)},
        timeout=10,
    )
    tampered = requests.post(
        web.hook,
        data=body.replace(b"completed", b"cancelled", 1),
        headers={"Content-Type": "application/json", "X-BatchRouter-Signature": sign(secret, body)},
        timeout=10,
    )
    assert [r.status_code for r in (missing, wrong, tampered)] == [401, 401, 401]
    assert all(r.json()["error"]["code"] == "invalid_signature" for r in (missing, wrong, tampered))
    time.sleep(2)
    assert read_manifest(tmp_path / "storage", batch_id) is None
    out = run_cli(web.service.env, "ls", "--json")
    assert json.loads(out.stdout) == []


def test_malformed_signed_body_is_400_and_service_stays_healthy(web, secret):
    cases = [
        b"{not json",
        b"[1, 2, 3]",
        b'"just a string"',
        json.dumps({"type": "batch.completed", "data": {"status": "completed"}}).encode(),
        json.dumps({"type": "batch.completed", "data": {"batch_id": "../../etc/passwd"}}).encode(),
        json.dumps({"event": "batch.completed", "batch_id": "a/b"}).encode(),
        json.dumps({"type": 12, "data": {"batch_id": "bat_1"}}).encode(),
        b"\xff\xfe not utf-8",
        b"[" * 100000 + b"]" * 100000,
    ]
    for body in cases:
        r = requests.post(
            web.hook,
            data=body,
            headers={"Content-Type": "application/json", "X-BatchRouter-Signature": sign(secret, body)},
            timeout=10,
        )
        assert r.status_code == 400, (body[:60], r.status_code, r.text[:200])
        assert r.json()["error"]["message"]
    assert requests.get(f"{web.url}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{web.url}/readyz", timeout=5).status_code == 200


def test_wrong_content_type_and_oversize_body(web, secret):
    body = json.dumps({"type": "batch.progress", "data": {"batch_id": "bat_x"}}).encode()
    r = requests.post(
        web.hook, data=body, headers={"Content-Type": "text/plain", "X-BatchRouter-Signature": sign(secret, body)}, timeout=10
    )
    assert r.status_code == 415
    big = b'{"pad": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    r = requests.post(
        web.hook, data=big, headers={"Content-Type": "application/json", "X-BatchRouter-Signature": sign(secret, big)}, timeout=10
    )
    assert r.status_code == 413


def test_progress_event_is_ignored_and_redelivery_is_duplicate(web, secret):
    body = json.dumps(
        {"id": "evt_progress_1", "type": "batch.progress", "created": 1, "data": {"batch_id": "bat_p", "status": "processing"}}
    ).encode()
    headers = {"Content-Type": "application/json", "X-BatchRouter-Signature": sign(secret, body)}
    first = requests.post(web.hook, data=body, headers=headers, timeout=10).json()
    second = requests.post(web.hook, data=body, headers=headers, timeout=10).json()
    assert first == {"status": "ignored", "event_id": "evt_progress_1"}
    assert second == {"status": "duplicate", "event_id": "evt_progress_1"}


@pytest.mark.parametrize("status", ["failed", "cancelled", "canceled", "expired"])
def test_unsuccessful_batch_gets_a_manifest_without_results(emulator, web, worker, secret, tmp_path, status):
    spelling = "canceled" if status == "canceled" else "cancelled"
    batch_id = emulator.create_batch(items=5, cancel_spelling=spelling)["id"]
    emulator.complete(batch_id, status="cancelled" if status == "canceled" else status)
    manifest = stored(tmp_path, batch_id)
    assert manifest["status"] == status
    assert manifest["files"] == []
    assert not (tmp_path / "storage" / "results").exists()


def test_error_file_is_stored_beside_results(emulator, web, worker, secret, tmp_path):
    batch_id = emulator.create_batch(items=40, error_items=3)["id"]
    emulator.complete(batch_id)
    manifest = stored(tmp_path, batch_id)
    keys = [f["key"] for f in manifest["files"]]
    day = manifest["stored_at"][:10]
    assert keys == [f"results/dt={day}/batch_id={batch_id}/results.jsonl", f"errors/dt={day}/batch_id={batch_id}/errors.jsonl"]
    assert manifest["files"][1]["lines"] == 3
    assert manifest["files"][1]["sha256"] == emulator.expected(batch_id)["errors"]["sha256"]


@pytest.mark.parametrize(
    "fault",
    [
        {"target": "artifact", "kind": "drop", "after_bytes": 300_000},
        {"target": "artifact", "kind": "truncate", "after_bytes": 100_000},
        {"target": "artifact", "kind": "expired"},
        {"target": "artifact", "kind": "429", "retry_after": 1},
        {"target": "artifact", "kind": "500"},
        {"target": "artifact", "kind": "stall", "after_bytes": 50_000, "stall_seconds": 6},
        {"target": "api", "kind": "429", "retry_after": 1, "count": 2},
        {"target": "api", "kind": "503", "count": 3},
    ],
    ids=lambda f: f"{f['target']}-{f['kind']}",
)
def test_injected_fault_still_ends_in_a_correct_result(emulator, web, worker, secret, tmp_path, fault):
    batch_id = emulator.create_batch(items=4000, line_bytes=256)["id"]
    emulator.fault(batch_id=batch_id, **fault)
    emulator.complete(batch_id)
    manifest = stored(tmp_path, batch_id, timeout=90)
    expected = emulator.expected(batch_id)["results"]
    entry = manifest["files"][0]
    assert entry["sha256"] == expected["sha256"] == file_sha256(tmp_path / "storage" / entry["key"])
    assert not [p for p in all_files(tmp_path / "storage") if p.name.endswith(".part")]


def test_range_unsupported_host_still_resumes_correctly(emulator, web, worker, secret, tmp_path):
    batch_id = emulator.create_batch(items=4000, line_bytes=256, ranges=False)["id"]
    emulator.fault(batch_id=batch_id, target="artifact", kind="drop", after_bytes=200_000)
    emulator.complete(batch_id)
    manifest = stored(tmp_path, batch_id, timeout=90)
    assert manifest["files"][0]["sha256"] == emulator.expected(batch_id)["results"]["sha256"]


def test_sigkill_mid_download_leaves_no_final_file_and_a_new_worker_finishes(emulator, web, secret, receiver_env, tmp_path):
    import sys

    from .conftest import Service

    batch_id = emulator.create_batch(items=200_000, line_bytes=1000)["id"]  # 200 MB
    emulator.fault(batch_id=batch_id, target="artifact", kind="stall", after_bytes=20_000_000, stall_seconds=30)
    first = Service("worker-a", [sys.executable, "-m", "receiver", "worker"], receiver_env, tmp_path).start()
    emulator.complete(batch_id)
    parts = lambda: [p for p in all_files(tmp_path / "storage") if p.name.endswith(".part") and p.stat().st_size > 0]  # noqa: E731
    wait_for(parts, timeout=60, what="a partial file")
    first.kill()
    assert not list((tmp_path / "storage").rglob("results.jsonl"))
    assert read_manifest(tmp_path / "storage", batch_id) is None

    second = Service("worker-b", [sys.executable, "-m", "receiver", "worker"], receiver_env, tmp_path).start()
    try:
        manifest = stored(tmp_path, batch_id, timeout=180)
    finally:
        second.stop()
    entry = manifest["files"][0]
    assert entry["sha256"] == emulator.expected(batch_id)["results"]["sha256"]
    assert entry["bytes"] == 200_000_000


def test_sigterm_releases_the_job_for_the_next_worker(emulator, web, secret, receiver_env, tmp_path):
    import sys

    from receiver.ledger import Ledger

    from .conftest import Service

    batch_id = emulator.create_batch(items=100_000, line_bytes=1000)["id"]
    emulator.fault(batch_id=batch_id, target="artifact", kind="stall", after_bytes=5_000_000, stall_seconds=2)
    first = Service("worker-a", [sys.executable, "-m", "receiver", "worker"], receiver_env, tmp_path).start()
    emulator.complete(batch_id)
    ledger = Ledger(receiver_env["DATABASE_URL"])
    wait_for(lambda: (ledger.job(batch_id) or {}).get("state") == "running", what="job running")
    assert first.stop() == 0
    job = ledger.job(batch_id)
    assert job["state"] == "queued" and job["lease_owner"] is None
    assert not [p for p in all_files(tmp_path / "storage") if p.name.endswith(".part")]
    second = Service("worker-b", [sys.executable, "-m", "receiver", "worker"], receiver_env, tmp_path).start()
    try:
        stored(tmp_path, batch_id, timeout=120)
    finally:
        second.stop()


def test_sigterm_interrupts_a_download_stalled_on_a_silent_host(emulator, web, secret, receiver_env, tmp_path):
    """SIGTERM does not wait for the read timeout: the blocked read is cut short, the job given back.

    The stall (100 s) is shorter than the read timeout (120 s) and began as the last bytes went out,
    so a worker that exits while the emulator is still stalling exited before its read could time out.
    """
    import sys

    from receiver.ledger import Ledger

    from .conftest import Service

    batch_id = emulator.create_batch(items=20_000, line_bytes=1000)["id"]
    emulator.fault(batch_id=batch_id, target="artifact", kind="stall", after_bytes=2 << 20, stall_seconds=100)
    # A short lease: its heartbeat, a second apart, notes in the ledger how many bytes came in.
    env = {**receiver_env, "RECEIVER_READ_TIMEOUT_SECONDS": "120", "RECEIVER_LEASE_SECONDS": "3"}
    worker = Service("worker", [sys.executable, "-m", "receiver", "worker"], env, tmp_path).start()
    emulator.complete(batch_id)
    ledger = Ledger(receiver_env["DATABASE_URL"])
    # Every byte before the stall (two whole 1 MiB blocks) came in: the worker is now blocked
    # reading from a silent host.
    wait_for(lambda: (ledger.job(batch_id) or {}).get("bytes_so_far") == 2 << 20, what="the bytes before the stall")
    assert emulator.stats()["stalls_in_progress"] == 1

    assert worker.stop() == 0, worker.output()
    assert emulator.stats()["stalls_in_progress"] == 1  # still stalling: no read timeout fired
    job = ledger.job(batch_id)
    assert job["state"] == "queued" and job["lease_owner"] is None
    assert not [p for p in all_files(tmp_path / "storage") if p.name.endswith(".part")]
    assert "released (shutting down)" in worker.output()


def test_a_lost_lease_interrupts_a_download_stalled_on_a_silent_host(emulator, web, secret, receiver_env, tmp_path):
    """The heartbeat finds the lease gone (another worker took the job): the blocked read is cut
    short then and there, and nothing is published, as for SIGTERM above."""
    import sys

    import sqlalchemy as sa

    from receiver.ledger import Ledger
    from receiver.ledger.schema import jobs

    from .conftest import Service

    batch_id = emulator.create_batch(items=20_000, line_bytes=1000)["id"]
    emulator.fault(batch_id=batch_id, target="artifact", kind="stall", after_bytes=2 << 20, stall_seconds=100)
    env = {**receiver_env, "RECEIVER_READ_TIMEOUT_SECONDS": "120", "RECEIVER_LEASE_SECONDS": "3"}
    worker = Service("worker", [sys.executable, "-m", "receiver", "worker"], env, tmp_path).start()
    try:
        emulator.complete(batch_id)
        ledger = Ledger(receiver_env["DATABASE_URL"])
        wait_for(lambda: (ledger.job(batch_id) or {}).get("bytes_so_far") == 2 << 20, what="the bytes before the stall")
        with ledger.engine.begin() as conn:  # as if another worker had taken the job over, for an hour
            taken = {"lease_owner": "worker-elsewhere", "lease_expires_at": time.time() + 3600}
            conn.execute(sa.update(jobs).where(jobs.c.batch_id == batch_id).values(**taken))
        wait_for(lambda: f"lease on {batch_id} lost" in worker.output(), what="the job dropped")
        assert emulator.stats()["stalls_in_progress"] == 1  # still stalling: no read timeout fired
        assert not [p for p in all_files(tmp_path / "storage") if p.name.endswith(".part")]
        assert read_manifest(tmp_path / "storage", batch_id) is None
        assert ledger.job(batch_id)["lease_owner"] == "worker-elsewhere"
    finally:
        code = worker.stop()
    assert code == 0


def test_duckdb_reads_the_layout_with_hive_partitions(emulator, web, worker, secret, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    ids = [emulator.create_batch(items=n)["id"] for n in (10, 20, 30)]
    for batch_id in ids:
        emulator.complete(batch_id)
    for batch_id in ids:
        stored(tmp_path, batch_id)
    root = tmp_path / "storage"
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT batch_id, count(*) FROM read_json_auto('{root}/results/dt=*/batch_id=*/*.jsonl', hive_partitioning=true) "
        "GROUP BY batch_id ORDER BY 2"
    ).fetchall()
    assert rows == [(ids[0], 10), (ids[1], 20), (ids[2], 30)]


def test_fetch_ls_cat_status(emulator, receiver_env, tmp_path):
    batch_id = emulator.create_batch(items=77, status="completed")["id"]
    out = run_cli(receiver_env, "fetch", batch_id)
    assert out.returncode == 0, out.stderr
    assert read_manifest(tmp_path / "storage", batch_id)["files"][0]["lines"] == 77
    again = run_cli(receiver_env, "fetch", batch_id)
    assert again.returncode == 0
    assert emulator.stats()["artifact_requests"][batch_id] == 1

    cat = run_cli(receiver_env, "cat", batch_id)
    assert cat.returncode == 0
    assert hashlib.sha256(cat.stdout).hexdigest() == emulator.expected(batch_id)["results"]["sha256"]
    assert run_cli(receiver_env, "cat", "bat_not_stored").returncode == 1

    listing = json.loads(run_cli(receiver_env, "ls", "--json").stdout)
    assert [(r["batch_id"], r["state"], r["lines"]) for r in listing] == [(batch_id, "stored", 77)]
    status = json.loads(run_cli(receiver_env, "status", "--json").stdout)
    assert status["jobs"]["stored"] == 1 and status["queue_depth"] == 0

    missing = run_cli(receiver_env, "fetch", "bat_unknown_to_batchrouter")
    assert missing.returncode == 1
    assert b"bat_unknown_to_batchrouter: BatchRouter does not know this batch (404)" in missing.stderr
    # A mistyped id leaves nothing behind: no dead row in `ls` or `status`.
    listing = json.loads(run_cli(receiver_env, "ls", "--json").stdout)
    assert [r["batch_id"] for r in listing] == [batch_id]
    assert json.loads(run_cli(receiver_env, "status", "--json").stdout)["jobs"]["dead"] == 0


def test_bad_setting_is_one_line_and_exit_2(receiver_env):
    for name, value in [
        ("RECEIVER_STORAGE_URL", "ftp://x/y"),
        ("RECEIVER_WORKER_CONCURRENCY", "many"),
        ("BATCHROUTER_API_URL", "http://api.example.com"),
        ("DATABASE_URL", "mysql://x"),
    ]:
        env = dict(receiver_env, **{name: value})
        for args in (["worker"], ["status"], ["serve"]):
            out = run_cli(env, *args, timeout=30)
            assert out.returncode == 2, (name, args, out.stderr)
            lines = out.stderr.decode().strip().splitlines()
            assert len(lines) == 1 and name in lines[0], (name, args, lines)
    import subprocess
    import sys

    env = dict(receiver_env, RECEIVER_STORAGE_URL="ftp://x/y")
    out = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "python:receiver.web.gunicorn_conf", "receiver.app:create_app()"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert out.stderr.decode().strip().count("\n") == 0 and "RECEIVER_STORAGE_URL" in out.stderr.decode()


def test_metrics_sum_across_gunicorn_workers(web, secret):
    for i in range(10):
        body = json.dumps({"id": f"evt_m{i}", "type": "batch.progress", "data": {"batch_id": "bat_m"}}).encode()
        requests.post(
            web.hook,
            data=body,
            headers={"Content-Type": "application/json", "X-BatchRouter-Signature": sign(secret, body)},
            timeout=10,
        )
    text = requests.get(f"{web.url}/metrics", timeout=10).text
    line = next(ln for ln in text.splitlines() if ln.startswith('receiver_deliveries_total{outcome="ignored"}'))
    assert float(line.split()[-1]) == 10
    assert "receiver_queue_depth" in text


def test_no_secret_configured_means_401(web):
    body = b'{"type": "batch.progress"}'
    r = requests.post(
        web.hook,
        data=body,
        headers={"Content-Type": "application/json", "X-BatchRouter-Signature": sign("anything-at-all", body)},
        timeout=10,
    )
    assert r.status_code == 401

"""It loses nothing: load, chaos and hostile-input suites against real processes (issue 5).

Each suite starts its own stack (the emulator, gunicorn with the production settings, `receiver
worker` processes) on loopback, drives it from outside and checks the invariants of
docs/architecture.md ("Invariants") on what an operator can observe: answers, the ledger, the
storage, the emulator's counters, the logs.

Sizes come from RELIABILITY_SCALE (`ci`, the default, or `full`, the issue's sizes); the figures of
each run are printed and, with RELIABILITY_FIGURES=path, collected in a JSON file (RELIABILITY.md).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from receiver.layout import is_part_key

from ._reliability import (
    SCALE,
    SIZE,
    DiskOutage,
    Sender,
    children_of,
    kill,
    ledger_query,
    new_api_key,
    new_secret,
    parallel,
    progress,
    receiver_env,
    record_figures,
    register_webhook,
    secret_leaks,
    signed,
    start_emulator,
    start_web,
    start_worker,
    store_secret,
    wait_jobs_settled,
    walk_files,
)
from .conftest import run_cli, wait_for
from .test_pipeline import file_sha256 as sha256_file

# The full size runs for many minutes; the CI size stays within the default per-test limit.
pytestmark = pytest.mark.timeout(300 if SCALE == "ci" else 3600)

_BATCH_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")


def _results_files(storage: Path, batch_id: str) -> list[Path]:
    return sorted(storage.glob(f"results/dt=*/batch_id={batch_id}/results*"))


def _check_stored_once(storage: Path, batch_id: str, expected: dict[str, Any]) -> dict[str, Any]:
    """The batch has one manifest and one whole results file whose bytes match the emulator's."""
    manifest = json.loads((storage / "manifests" / f"{batch_id}.json").read_text())
    files = _results_files(storage, batch_id)
    assert len(files) == 1, f"{batch_id}: {len(files)} results files"
    [entry] = [f for f in manifest["files"] if f["key"].startswith("results/")]
    assert storage / entry["key"] == files[0]
    assert entry["sha256"] == expected["sha256"] == sha256_file(files[0]), batch_id
    assert entry["bytes"] == expected["bytes"] == files[0].stat().st_size, batch_id
    return manifest


# --- load -------------------------------------------------------------------------------------------


def test_load_every_batch_stored_once_no_5xx_nothing_lost(tmp_path: Path) -> None:
    """N deliveries at C connections, a third duplicates (at once and later), for B batches."""
    n_total, n_batches, connections = SIZE["deliveries"], SIZE["batches"], SIZE["connections"]
    n_dups = n_total // 3
    n_distinct = n_total - n_dups
    assert n_distinct >= 2 * n_batches

    api_key, secret = new_api_key(), new_secret()
    emulator = start_emulator(tmp_path, api_key)
    env = receiver_env(tmp_path, emulator.url, api_key, RECEIVER_WORKER_CONCURRENCY="8")
    store_secret(env, secret)
    web = start_web(env, tmp_path)
    workers = [start_worker(env, tmp_path, f"worker-{i}") for i in range(2)]
    storage = tmp_path / "storage"
    hook = f"http://127.0.0.1:{env['PORT']}/hooks/batchrouter"
    try:
        # Batches of different sizes, so a results file stored under the wrong batch would not match.
        created = parallel(
            lambda i: emulator.create_batch(id=f"bat_load_{i:05d}", items=10 + i % 53, line_bytes=160, status="processing"),
            range(n_batches),
        )
        batch_ids = [b["id"] for b in created]
        completions = parallel(lambda b: emulator.complete(b, deliver=False), batch_ids)

        # The distinct events: each batch's completion (envelope), a progress event, and as many
        # more (flat-form completions, whose id is derived, and more progress) as the size asks.
        distinct = []
        for batch_id, sent in zip(batch_ids, completions):
            distinct.append(signed(secret, sent["body"].encode(), event_id=sent["event_id"], batch_id=batch_id))
            distinct.append(progress(secret, batch_id, 1))
        extra = 0
        while len(distinct) < n_distinct:
            batch_id = batch_ids[(extra // 2) % n_batches]
            if extra % 2 == 0:
                distinct.append(signed(secret, {"event": "batch.completed", "batch_id": batch_id}, batch_id=batch_id))
            else:
                distinct.append(progress(secret, batch_id, 2 + extra))
            extra += 1
        assert len({d.body for d in distinct}) == n_distinct
        rng = random.Random(5)
        rng.shuffle(distinct)
        # Half the duplicates go right next to their original (two connections send them at once),
        # the other half in a second wave after the first has been answered.
        originals = rng.sample(distinct, n_dups) if n_dups <= len(distinct) else [rng.choice(distinct) for _ in range(n_dups)]
        concurrent, later = originals[: n_dups // 2], originals[n_dups // 2 :]
        first_wave = []
        pair = set(map(id, concurrent))
        for d in distinct:
            first_wave.append(d)
            if id(d) in pair:
                first_wave.append(d)
        later_wave = list(later)
        rng.shuffle(later_wave)

        sender = Sender(hook, connections)
        started = time.monotonic()
        answers = sender.send(first_wave)
        answers += sender.send(later_wave)
        ack_seconds = time.monotonic() - started

        statuses = Counter(a.status for a in answers)
        assert statuses == Counter({200: n_total}), statuses
        outcomes: dict[bytes, list[str]] = {}
        for a in answers:
            outcomes.setdefault(a.delivery.body, []).append(json.loads(a.body)["status"])
        # Each distinct event is recorded once: one accepted/ignored answer, the rest duplicates.
        for body, seen in outcomes.items():
            firsts = [s for s in seen if s != "duplicate"]
            assert len(firsts) == 1, (body[:80], seen)
        event_ids = {json.loads(a.body)["event_id"] for a in answers}
        assert len(event_ids) == len(outcomes) == n_distinct

        # Nothing lost: every acknowledged event id is in the ledger.
        recorded = {row[0] for row in ledger_query(env, "SELECT event_id FROM deliveries")}
        lost = event_ids - recorded
        assert not lost, f"{len(lost)} acknowledged deliveries are not in the ledger"

        states = wait_jobs_settled(env, batch_ids, timeout=60 + n_batches * 0.5, settled=("stored",))
        stored_seconds = time.monotonic() - started
        assert len(states) == n_batches

        expected = parallel(lambda b: emulator.expected(b)["results"], batch_ids)
        for batch_id, want in zip(batch_ids, expected):
            _check_stored_once(storage, batch_id, want)
        downloads = emulator.stats()["artifact_requests"]
        assert {b: downloads.get(b) for b in batch_ids} == {b: 1 for b in batch_ids}
        assert not [p for p in walk_files(storage) if p.name.endswith(".part")]
        web_log = web.output()
        assert "Traceback" not in web_log and "WORKER TIMEOUT" not in web_log
    finally:
        for w in workers:
            w.stop()
        web.stop()
        emulator.service.stop()
    assert not secret_leaks([tmp_path], [], [secret, api_key])
    record_figures(
        "load",
        {
            "deliveries_sent": n_total,
            "distinct_events": n_distinct,
            "duplicates_concurrent": len(concurrent),
            "duplicates_later": len(later),
            "batches": n_batches,
            "connections": connections,
            "answers_by_status": {str(k): v for k, v in statuses.items()},
            "answers_5xx": sum(v for k, v in statuses.items() if k >= 500),
            "resent_after_connection_error": sum(a.retries for a in answers),
            "lost": len(lost),
            "batches_stored": sum(1 for s, _ in states.values() if s == "stored"),
            "duplicates_stored": sum(len(_results_files(storage, b)) - 1 for b in batch_ids),
            "artifact_downloads": sum(downloads.get(b, 0) for b in batch_ids),
            "seconds_to_acknowledge_all": round(ack_seconds, 1),
            "deliveries_per_second": round(n_total / ack_seconds),
            "seconds_until_all_stored": round(stored_seconds, 1),
        },
    )


# --- chaos ------------------------------------------------------------------------------------------

#: Faults the emulator injects, one drawn per batch (None: no fault). `after_bytes` is drawn per batch.
_FAULTS: list[dict[str, Any] | None] = [
    None,
    None,
    {"target": "artifact", "kind": "drop"},
    {"target": "artifact", "kind": "truncate"},
    {"target": "artifact", "kind": "429", "retry_after": 1},
    {"target": "artifact", "kind": "500"},
    {"target": "artifact", "kind": "503", "count": 2},
    {"target": "artifact", "kind": "expired"},
    # Longer than the read timeout set below: the download must give the slot up and resume.
    {"target": "artifact", "kind": "stall", "stall_seconds": 5},
    {"target": "api", "kind": "429", "retry_after": 1, "count": 2},
    {"target": "api", "kind": "503", "count": 2},
    {"target": "api", "kind": "drop", "after_bytes": 20},
]


class _Chaos:
    """Kills gunicorn workers and `receiver worker` processes at random moments, and takes the
    storage away for a while, on a thread of its own until stopped."""

    def __init__(self, web: Any, workers: list[Any], outage: Any, rng: random.Random) -> None:
        self.web, self.workers, self.outage, self.rng = web, workers, outage, rng
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._outages: list[threading.Thread] = []

    def storage_outage(self) -> None:
        """Take the storage away now, for a few seconds, on a thread of its own."""

        def run() -> None:
            try:
                self.outage.fail()
                started = time.monotonic()
                self.counts["storage_outages"] += 1
                time.sleep(self.rng.uniform(3, 6))
                # Held until a worker has met it (30 s at most): on a loaded machine the jobs in
                # flight may reach their storage step only later, and an outage no job met tests
                # nothing (the assertion below would then fail for the machine's sake, not ours).
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not any("StorageUnavailable" in k for k in _worker_failures(self.workers)):
                    time.sleep(0.2)
                self.counts["storage_outage_seconds"] += round(time.monotonic() - started)
            except BaseException as exc:  # noqa: BLE001
                self.errors.append(exc)
            finally:
                self.outage.heal()

        thread = threading.Thread(target=run, daemon=True)
        self._outages.append(thread)
        thread.start()

    def __enter__(self) -> _Chaos:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join()
        for t in self._outages:
            t.join()
        if self.errors:
            raise self.errors[0]

    def _run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(0.3, 1.5)):
                roll = self.rng.random()
                if roll < 0.5:
                    pids = children_of(self.web.proc.pid)
                    if pids and kill(self.rng.choice(pids)):
                        self.counts["gunicorn_workers_killed"] += 1
                else:
                    victim = self.rng.choice(self.workers)
                    victim.kill()
                    self.counts["receiver_workers_killed"] += 1
                    self.stop.wait(self.rng.uniform(0, 1.0))
                    victim.start()
        except BaseException as exc:  # noqa: BLE001 - raised in the test's thread on exit
            self.errors.append(exc)


class _S3Outage:
    """The S3 endpoint goes away: every connection through the proxy is reset until heal()."""

    kind = "s3-endpoint-down"

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    def fail(self) -> None:
        self.proxy.fail()

    def heal(self) -> None:
        self.proxy.heal()


@pytest.mark.parametrize("storage_kind", ["local", "s3"])
def test_chaos_every_batch_stored_once_whole_and_dead_jobs_recover(tmp_path: Path, storage_kind: str) -> None:
    import contextlib

    n_batches = SIZE["chaos_batches"]
    rng = random.Random(f"chaos-{storage_kind}-{n_batches}")
    api_key, secret = new_api_key(), new_secret()
    overrides = {
        "RECEIVER_READ_TIMEOUT_SECONDS": "1.5",
        "RECEIVER_LEASE_SECONDS": "4",
        "RECEIVER_MAX_ATTEMPTS": "5",
        "RECEIVER_WORKER_CONCURRENCY": "4",
        # Some terminal deliveries are lost outright: the polling fallback must store those batches.
        "RECEIVER_POLL_SECONDS": "2",
    }
    with contextlib.ExitStack() as stack:
        s3 = None
        if storage_kind == "s3":
            from ._moto import AWS_TEST_ENV, FlakyProxy, aws_test_env, moto_server

            stack.enter_context(aws_test_env())
            endpoint = stack.enter_context(moto_server())
            proxy = stack.enter_context(FlakyProxy.to(endpoint))
            import boto3

            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            s3.create_bucket(Bucket="chaos")
            overrides.update(AWS_TEST_ENV)
            # Two attempts per S3 request (botocore's own retries would ride out a short outage
            # unseen): the outage reaches the worker, which must abort and retry the upload.
            overrides.update(
                {
                    "RECEIVER_STORAGE_URL": "s3://chaos/receiver",
                    "AWS_ENDPOINT_URL_S3": proxy.url,
                    "AWS_MAX_ATTEMPTS": "2",
                    "AWS_CONFIG_FILE": "/dev/null",
                    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                }
            )
            outage: Any = _S3Outage(proxy)
        else:
            outage = DiskOutage(tmp_path / "storage", size_mb=64 + n_batches)
            stack.callback(outage.close)

        # The downstream consumer fails a fifth of the POSTs and is down for a while mid-run.
        from ._sink import SECRET as NOTIFY_SECRET
        from ._sink import Sink

        sink = Sink(fail_ratio=0.2, seed=f"chaos-{storage_kind}").up()
        stack.callback(sink.down)
        overrides.update({"RECEIVER_NOTIFY_URL": sink.url, "RECEIVER_NOTIFY_SECRET": NOTIFY_SECRET})
        emulator = start_emulator(tmp_path, api_key)
        stack.callback(emulator.service.stop)
        env = receiver_env(tmp_path, emulator.url, api_key, **overrides)
        store_secret(env, secret)
        web = start_web(env, tmp_path)
        stack.callback(web.stop)
        workers = [start_worker(env, tmp_path, f"worker-{i}") for i in range(2)]
        for w in workers:
            stack.callback(w.stop)
        register_webhook(emulator, api_key, f"http://127.0.0.1:{env['PORT']}/hooks/batchrouter", secret)

        # A few batches are doomed: the API fails them until the end, so they must end `dead`
        # with a reason, and `receiver fetch` must recover them once the API is back.
        n_doomed = max(2, n_batches // 40)
        # Batches whose terminal delivery BatchRouter never sends (only a progress event arrives);
        # none of them is the batch sent when the storage goes away (n // 3, 2n // 3), whose
        # delivered job must meet the outage.
        lost = {f"bat_chaos_{i:04d}" for i in range(n_doomed, n_batches) if i % 5 == 4} - {
            f"bat_chaos_{i:04d}" for i in (n_batches // 3, 2 * n_batches // 3)
        }
        injected: Counter[str] = Counter()
        batches = []
        paged_ids: set[str] = set()
        for i in range(n_batches):
            spec = {"id": f"bat_chaos_{i:04d}", "items": rng.randint(300, 3000), "line_bytes": 256, "status": "processing"}
            if i % 7 == 3:
                spec["error_items"] = rng.randint(1, 20)
            if i % 11 == 5:
                spec["gzip"] = True
            if i % 13 == 6:
                spec["ranges"] = False
            if s3 is not None and i % 10 == 9:
                spec["items"] = 40_000  # 10 MB: a multipart upload of two parts
            paged = i % 9 == 4 and "error_items" not in spec and "gzip" not in spec
            if paged:  # no signed download: the results come raw through /results, the same bytes
                spec.update(artifact_url=False, results_form="jsonl")
                paged_ids.add(spec["id"])
            emulator.create_batch(**spec)
            size = spec["items"] * 256
            if i < n_doomed:
                emulator.fault(batch_id=spec["id"], target="api", kind="503", count=100_000)
                injected["api-503-until-fetch"] += 1
            else:
                fault = rng.choice(_FAULTS)
                if fault is not None:
                    fault = dict(fault)
                    if paged and fault["target"] == "artifact":
                        # Cut /results instead: only its body is longer than 1,000 bytes among the
                        # job's three API calls (batch, artifact-url, results), each taking one count.
                        fault = {
                            "target": "api",
                            "kind": rng.choice(["drop", "truncate"]),
                            "count": 3,
                            "after_bytes": rng.randint(1000, max(1000, size // 2)),
                        }
                    if fault["kind"] in ("drop", "truncate", "stall") and fault["target"] == "artifact":
                        fault["after_bytes"] = rng.randint(1, max(1, size // 2))
                    emulator.fault(batch_id=spec["id"], **fault)
                    injected[f"{fault['target']}-{fault['kind']}"] += 1
            batches.append(spec["id"])

        started = time.monotonic()
        outage_at = {n_batches // 3, 2 * n_batches // 3} if n_batches >= 100 else {n_batches // 3}
        with _Chaos(web, workers, outage, rng) as chaos:
            for i, batch_id in enumerate(batches):
                if i in outage_at:
                    chaos.storage_outage()
                if i == n_batches // 2:
                    sink.down()
                if i == 3 * n_batches // 4:
                    sink.up()
                # Two signed deliveries of the same event at once, retried by the emulator like
                # BatchRouter when a killed gunicorn worker drops the connection.
                if batch_id in lost:
                    _send_progress(emulator, batch_id)
                    emulator.complete(batch_id, deliver=False)
                else:
                    emulator.complete(batch_id, copies=2)
                time.sleep(rng.uniform(0, 0.2))
            # Keep the chaos going while the backlog drains, then let it settle.
            wait_for(
                lambda: (
                    chaos.errors or chaos.counts["receiver_workers_killed"] >= 3 and chaos.counts["gunicorn_workers_killed"] >= 3
                ),
                timeout=300,
                interval=0.5,
                what="chaos to have struck",
            )
        chaos_seconds = time.monotonic() - started
        for w in workers:
            if w.proc is None:
                w.start()

        states = wait_jobs_settled(env, batches, timeout=120 + n_batches * 2)
        dead = {b: e for b, (s, e) in states.items() if s == "dead"}
        assert set(batches[:n_doomed]) <= set(dead), "the doomed batches should have ended dead"
        for batch_id, reason in dead.items():
            assert reason, f"{batch_id} is dead without a reason"
        doomed_reason = dead[batches[0]]
        assert "503" in doomed_reason or "unavailable" in doomed_reason.lower(), doomed_reason

        requests.delete(f"{emulator.url}/_emulator/faults", timeout=10).raise_for_status()
        fetched = run_cli(env, "fetch", *sorted(dead), timeout=600)
        assert fetched.returncode == 0, fetched.stderr.decode()[-2000:]
        states = wait_jobs_settled(env, batches, timeout=60, settled=("stored",))
        total_seconds = time.monotonic() - started

        # Every delivery was finally acknowledged, never with a 5xx, and is in the ledger.
        deliveries = emulator.stats()["deliveries"]
        finals = [d for d in deliveries if d["final"]]
        assert len(finals) == 2 * (n_batches - len(lost)) + len(lost) and all(d["ok"] for d in finals)
        five_xx = [d for d in deliveries if d["status"] is not None and d["status"] >= 500]
        assert not five_xx, five_xx[:3]
        recorded = {row[0] for row in ledger_query(env, "SELECT event_id FROM deliveries")}
        assert {d["event_id"] for d in finals} <= recorded

        # Every batch stored once, whole and correct; nothing partial left anywhere.
        keys = _all_keys(tmp_path / "storage", s3)
        assert not [k for k in keys if is_part_key(k) or k.endswith(".part")]
        if s3 is not None:
            assert s3.list_multipart_uploads(Bucket="chaos").get("Uploads", []) == []
        duplicates = 0
        for batch_id in batches:
            expected = emulator.expected(batch_id)
            manifest = json.loads(_read(tmp_path / "storage", s3, f"manifests/{batch_id}.json"))
            assert manifest["status"] == "completed"
            assert manifest["source"] == ("results_pages" if batch_id in paged_ids else "artifact")
            results = [k for k in keys if k.startswith("results/") and f"/batch_id={batch_id}/" in k]
            duplicates += len(results) - 1
            assert len(results) == 1, (batch_id, results)
            wanted = {"results/": expected["results"], "errors/": expected["errors"]}
            assert len(manifest["files"]) == (2 if expected["errors"] else 1)
            for entry in manifest["files"]:
                want = wanted[entry["key"][: entry["key"].index("/") + 1]]
                data = _read(tmp_path / "storage", s3, entry["key"])
                assert entry["sha256"] == want["sha256"] == hashlib.sha256(data).hexdigest(), entry["key"]
        stray = [k for k in keys if not k.startswith(("results/", "errors/", "manifests/"))]
        assert not stray, stray[:5]
        # Every stored batch announced at least once, each with one webhook-id, signed.
        from ._sink import verify

        wait_for(
            lambda: {json.loads(r.body)["data"]["batch_id"] for r in sink.delivered()} >= set(batches),
            timeout=120,
            interval=0.5,
            what="every stored batch announced",
        )
        webhook_ids: dict[str, set[str]] = {}
        for received in sink.received:
            webhook_ids.setdefault(verify(received)["data"]["batch_id"], set()).add(received.headers["Webhook-Id"])
        assert all(len(ids) == 1 for ids in webhook_ids.values()), {b: i for b, i in webhook_ids.items() if len(i) > 1}
        announced = Counter(json.loads(r.body)["data"]["batch_id"] for r in sink.delivered())
        attempts = Counter(row[0] for row in ledger_query(env, "SELECT attempts FROM jobs"))
        origins = dict(ledger_query(env, "SELECT batch_id, origin FROM jobs"))
        assert {origins[b] for b in lost} <= {"poll"}, "a lost delivery's batch was queued by something else"
        web_log = web.output()
        assert "Traceback" not in web_log
        stats = emulator.stats()
        failures = _worker_failures(workers)
        # The storage outage reached the workers (and they got over it: everything is stored).
        assert any("StorageUnavailable" in k for k in failures), failures
        logs_text = [fetched.stdout.decode(), fetched.stderr.decode()]
    assert not secret_leaks([tmp_path], logs_text, [secret, api_key])
    assert stats["artifact_requests_with_authorization"] == 0
    record_figures(
        f"chaos-{storage_kind}",
        {
            "batches": n_batches,
            "storage": storage_kind,
            "storage_outage_kind": outage.kind,
            "faults_injected": dict(injected),
            "faults_injected_total": sum(injected.values()),
            "multipart_batches": sum(1 for i in range(n_batches) if s3 is not None and i % 10 == 9),
            "paged_batches": len(paged_ids),
            **dict(chaos.counts),
            "deliveries_sent": 2 * (n_batches - len(lost)) + len(lost),
            "terminal_deliveries_lost": len(lost),
            "stored_by_polling": sum(1 for b in lost if origins[b] == "poll"),
            "delivery_attempts": len(deliveries),
            "delivery_attempts_without_answer": sum(1 for d in deliveries if d["status"] is None),
            "answers_5xx": len(five_xx),
            "batches_stored": sum(1 for s, _ in states.values() if s == "stored"),
            "duplicates_stored": duplicates,
            "dead_before_fetch": len(dead),
            "recovered_by_fetch": len(dead),
            "partial_files_left": 0,
            "incomplete_multipart_uploads": 0 if s3 is not None else None,
            "worker_failures_by_error": failures,
            "job_attempts_histogram": {str(k): v for k, v in sorted(attempts.items())},
            "seconds_of_chaos": round(chaos_seconds, 1),
            "seconds_until_all_stored": round(total_seconds, 1),
            "notification_attempts": len(sink.received),
            "notifications_delivered_more_than_once": sum(1 for n in announced.values() if n > 1),
        },
    )


def _send_progress(emulator: Any, batch_id: str) -> None:
    """A signed progress event for `batch_id`, sent (and retried) by the emulator like BatchRouter."""
    body = {
        "id": f"evt_progress_{batch_id}",
        "type": "batch.progress",
        "created": int(time.time()),
        "data": {"batch_id": batch_id, "status": "processing"},
    }
    requests.post(f"{emulator.url}/_emulator/deliveries", json={"body": body}, timeout=10).raise_for_status()


def _all_keys(root: Path, s3: Any) -> list[str]:
    if s3 is None:
        return [str(p.relative_to(root)) for p in walk_files(root)]
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="chaos", Prefix="receiver/"):
        keys += [o["Key"].removeprefix("receiver/") for o in page.get("Contents", [])]
    return keys


def _read(root: Path, s3: Any, key: str) -> bytes:
    if s3 is None:
        return (root / key).read_bytes()
    return s3.get_object(Bucket="chaos", Key=f"receiver/{key}")["Body"].read()


def _worker_failures(workers: list[Any]) -> dict[str, int]:
    """What the workers logged going wrong, by error class (and in-download resumes), from their logs."""
    counts: Counter[str] = Counter()
    for w in workers:
        text = w.output()
        counts.update(f"job attempt: {m}" for m in re.findall(r"attempt \d+ failed, retry in [-\d.]+s: (\w+)", text))
        counts.update(f"dead: {m}" for m in re.findall(r"dead after \d+ attempts: (\w+)", text))
        counts.update(
            f"resumed: {m}"
            for m in re.findall(
                r"artifact download: .*?(stalled past the read timeout|closed the connection|answered \d+|cannot reach|broke off)",
                text,
            )
        )
    return dict(counts)


# --- hostile input ----------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FUZZ = settings(
    max_examples=SIZE["fuzz_examples"],
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
_ANSWERS = {200, 400, 401, 413, 415}


class _Hostile:
    """One running service for the hostile-input tests: emulator, gunicorn, a worker."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.api_key, self.secret = new_api_key(), new_secret()
        self.emulator = start_emulator(tmp, self.api_key)
        self.env = receiver_env(tmp, self.emulator.url, self.api_key)
        store_secret(self.env, self.secret)
        self.web = start_web(self.env, tmp)
        self.worker = start_worker(self.env, tmp)
        self.url = f"http://127.0.0.1:{self.env['PORT']}"
        self.hook = f"{self.url}/hooks/batchrouter"
        self.storage = tmp / "storage"
        self.http = requests.Session()
        self.outputs: list[str] = []
        self.answers: Counter[int] = Counter()
        #: Batch ids of signed terminal deliveries answered 200: the only jobs that may exist.
        self.signed_batches: set[str] = set()
        self.boots = self.web.output().count("Booting worker")

    def post(self, body: bytes, headers: dict[str, str]) -> requests.Response:
        r = self.http.post(self.hook, data=body, headers=headers, timeout=60)
        self.answers[r.status_code] += 1
        assert r.status_code in _ANSWERS, (r.status_code, body[:200], headers, r.text[:300])
        return r

    def post_signed(self, payload: Any, content_type: str = "application/json") -> requests.Response:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        from receiver.signature import sign

        r = self.post(body, {"Content-Type": content_type, "X-BatchRouter-Signature": sign(self.secret, body)})
        return r

    def assert_healthy(self) -> None:
        assert requests.get(f"{self.url}/healthz", timeout=10).status_code == 200
        ready = requests.get(f"{self.url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        log = self.web.output()
        assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:3000]
        # No gunicorn worker died or was restarted on the way (a crash would boot a new one).
        assert log.count("Booting worker") == self.boots

    def stop(self) -> None:
        self.worker.stop()
        self.web.stop()
        self.emulator.service.stop()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory):
    stack = _Hostile(tmp_path_factory.mktemp("hostile"))
    yield stack
    stack.stop()
    leaks = secret_leaks([stack.tmp], stack.outputs, [stack.secret, stack.api_key])
    assert not leaks, leaks
    record_figures(
        "hostile",
        {
            "answers_by_status": {str(k): v for k, v in sorted(stack.answers.items())},
            "answers_5xx": sum(v for k, v in stack.answers.items() if k >= 500),
            "requests": sum(stack.answers.values()),
        },
    )


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40))
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
_delivery_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=60), st.integers(), st.none()),
        "type": st.sampled_from(["batch.completed", "batch.failed", "batch.progress", "batch.canceled", "x"])
        | st.text(max_size=20),
        "event": st.sampled_from(["batch.completed", "batch.expired"]) | _json,
        "batch_id": st.from_regex(_BATCH_ID, fullmatch=True) | st.text(max_size=30) | _json,
        "status": st.sampled_from(["completed", "processing", "failed"]) | _json,
        "data": st.fixed_dictionaries({}, optional={"batch_id": st.text(max_size=30) | _json, "status": _json}) | _json,
        "batch": _json,
        "extra": _json,
    },
)
_encodings = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1"])
_content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-16",
        "application/cloudevents+json",
        "APPLICATION/JSON",
        "text/plain",
        "text/json",
        "",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=ebcdic",
        "application/jsonx",
    ]
) | st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
_header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20).filter(
    lambda n: n.lower() not in ("content-length", "transfer-encoding", "host", "connection", "expect", "content-type")
)
_headers = st.dictionaries(
    _header_names, st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip), max_size=4
)


def test_fuzzed_requests_never_get_5xx_and_unsigned_ones_are_refused(hostile: _Hostile) -> None:
    from receiver.signature import sign

    @_FUZZ
    @given(
        body=st.one_of(
            st.binary(max_size=3000),
            st.tuples(_delivery_like, _encodings).map(lambda t: json.dumps(t[0], ensure_ascii=False).encode(t[1], "replace")),
            _json.map(lambda v: json.dumps(v).encode()),
        ),
        content_type=_content_types,
        headers=_headers,
        signing=st.sampled_from(["right", "right", "none", "wrong", "prefixed", "upper", "garbage"]),
    )
    def check(body: bytes, content_type: str, headers: dict[str, str], signing: str) -> None:
        sent = {**headers, "Content-Type": content_type}
        good = sign(hostile.secret, body)
        sent["X-BatchRouter-Signature"] = {
            "right": good,
            "none": None,
            "wrong": sign(hostile.secret + "x", body),
            "prefixed": "sha256=" + good,
            "upper": good.upper(),
            "garbage": "zz" * 32,
        }[signing]
        if sent["X-BatchRouter-Signature"] is None:
            del sent["X-BatchRouter-Signature"]
        r = hostile.post(body, sent)
        is_signed = signing in ("right", "prefixed", "upper")
        if not is_signed:
            assert r.status_code in (401, 413, 415), (r.status_code, body[:100])
        if r.status_code == 200:
            answer = r.json()
            assert answer["status"] in ("accepted", "duplicate", "ignored")
            assert ledger_query(hostile.env, "SELECT 1 FROM deliveries WHERE event_id = ?", (answer["event_id"],))
            doc = json.loads(body)
            for holder in (
                doc.get("data") if isinstance(doc.get("data"), dict) else {},
                doc,
                doc.get("batch") if isinstance(doc.get("batch"), dict) else {},
            ):
                for key in ("batch_id", "id"):
                    if isinstance(holder.get(key), str) and _BATCH_ID.fullmatch(holder[key]):
                        hostile.signed_batches.add(holder[key])
        elif r.status_code != 200:
            assert r.json()["error"]["message"]

    check()
    # Nothing unsigned became a job: every job's batch id came in a signed, accepted delivery.
    jobs = {row[0] for row in ledger_query(hostile.env, "SELECT batch_id FROM jobs")}
    assert jobs <= hostile.signed_batches
    hostile.assert_healthy()


def test_hostile_encodings_nesting_and_sizes(hostile: _Hostile) -> None:
    limit = 1024 * 1024
    cases: list[tuple[bytes, str, set[int]]] = [
        # Deep nesting, at the top and inside a field the schema reads.
        (b"[" * 200_000 + b"]" * 200_000, "application/json", {400}),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "application/json", {400}),
        (b'{"type":"batch.progress","data":' + b'{"x":' * 50_000 + b"1" + b"}" * 50_000 + b"}", "application/json", {400}),
        (b'{"type":"batch.progress","data":{"batch_id":' + b"[" * 50_000 + b"]" * 50_000 + b"}}", "application/json", {400}),
        # Numbers Python refuses or cannot represent.
        (b'{"type":"batch.progress","n":' + b"9" * 5000 + b"}", "application/json", {400, 200}),
        (b'{"type":"batch.progress","n":1e999999}', "application/json", {200}),
        (b'{"type":"batch.progress","n":NaN}', "application/json", {200, 400}),
        # Strings that are not valid Unicode, and NUL bytes, in the fields we record.
        (b'{"id":"evt_\\ud800","type":"batch.progress"}', "application/json", {200, 400}),
        (b'{"id":"evt_ok","type":"batch.\\udfff"}', "application/json", {200, 400}),
        (b'{"id":"evt_\\u0000nul","type":"batch.progress"}', "application/json", {200, 400}),
        (b'{"type":"batch.completed","data":{"batch_id":"bat_\\ud800"}}', "application/json", {400}),
        # Encodings: UTF-16/32 with and without BOM, a lying charset, invalid UTF-8.
        ('{"id":"evt_utf16","type":"batch.progress"}'.encode("utf-16"), "application/json", {200, 400}),
        ('{"id":"evt_utf32","type":"batch.progress"}'.encode("utf-32"), "application/json", {200, 400}),
        ('{"id":"evt_bom","type":"batch.progress"}'.encode("utf-8-sig"), "application/json", {200, 400}),
        ('{"id":"evt_latin","type":"batch.prögress"}'.encode("latin-1"), "application/json; charset=utf-8", {400}),
        (b"\xc0\xaf\xed\xa0\x80", "application/json", {400}),
        (b"", "application/json", {400}),
        # The limit: just under is read, just over is refused.
        (b'{"type":"batch.progress","pad":"' + b"x" * (limit - 40) + b'"}', "application/json", {200}),
        (b'{"type":"batch.progress","pad":"' + b"x" * limit + b'"}', "application/json", {413}),
        (b"x" * (20 * limit), "application/json", {413}),
        (b'{"type":"batch.progress"}', "text/plain", {415}),
        (b'{"type":"batch.progress"}', "application/xml", {415}),
    ]
    for body, content_type, allowed in cases:
        r = hostile.post_signed(body, content_type)
        assert r.status_code in allowed, (body[:60], r.status_code, r.text[:300])
        if r.status_code == 200:
            assert ledger_query(hostile.env, "SELECT 1 FROM deliveries WHERE event_id = ?", (r.json()["event_id"],))
    # A body over the limit without a Content-Length (chunked) is refused too, and not read whole.
    from receiver.signature import sign

    chunks = (b"x" * 65536 for _ in range(40))
    r = hostile.http.post(
        hostile.hook,
        data=chunks,
        headers={"Content-Type": "application/json", "X-BatchRouter-Signature": sign(hostile.secret, b"")},
        timeout=60,
    )
    hostile.answers[r.status_code] += 1
    assert r.status_code == 413
    # A Content-Length that lies (longer than the body, then the client closes) gets no 5xx either.
    raw = _raw_request(hostile, b'{"type":"batch.progress"}', declared=5000, close_early=True)
    assert not raw.startswith(b"HTTP/1.1 5"), raw[:200]
    hostile.assert_healthy()


def _raw_request(
    hostile: _Hostile, body: bytes, *, declared: int | None = None, trickle: float = 0.0, close_early: bool = False
) -> bytes:
    """One POST over a raw socket, optionally trickled byte by byte; returns what came back."""
    import socket

    from receiver.signature import sign

    head = (
        f"POST /hooks/batchrouter HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-BatchRouter-Signature: {sign(hostile.secret, body)}\r\nContent-Length: {declared if declared is not None else len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", int(hostile.env["PORT"])), timeout=60) as sock:
        if trickle:
            for i in range(len(head + body)):
                sock.sendall((head + body)[i : i + 1])
                time.sleep(trickle)
        else:
            sock.sendall(head + body)
        if close_early:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_slow_clients_are_answered_and_do_not_stop_the_service(hostile: _Hostile) -> None:
    """A few clients trickle their request a byte at a time; the rest of the service carries on."""
    n_slow = 24  # more than any thread pool would have: under gevent each holds only a greenlet
    results: dict[int, bytes] = {}

    def slow(i: int) -> None:
        body = json.dumps({"id": f"evt_slow_{i}", "type": "batch.progress", "data": {"batch_id": f"bat_slow_{i}"}}).encode()
        results[i] = _raw_request(hostile, body, trickle=0.01)

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(n_slow)]
    for t in threads:
        t.start()
    # While they trickle, ordinary deliveries and health checks are answered.
    answered = 0
    while any(t.is_alive() for t in threads):
        r = hostile.post_signed({"id": f"evt_during_{answered}", "type": "batch.progress"})
        assert r.status_code == 200
        answered += 1
        assert requests.get(f"{hostile.url}/healthz", timeout=10).status_code == 200
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert answered > 0
    for i in range(n_slow):
        assert results[i].startswith(b"HTTP/1.1 200"), results[i][:200]
    hostile.assert_healthy()


_dangerous = st.lists(
    st.sampled_from(
        list("abc019_-.")
        + ["/", "\\", "..", "%2e", "%2f", "\x00", "\n", " ", ":", "~", "\u2024", "\uff0e", "\u2215", "é", "$", "*", "?"]
    ),
    max_size=16,
).map("".join) | st.sampled_from(
    ["..", ".", "../etc", "..\\..\\x", "a/../../b", "/etc/passwd", "~root", "a" * 201, ".hidden", "x/..", "%2e%2e", "..."]
)


def test_batch_ids_that_could_escape_the_storage_root_are_refused(hostile: _Hostile) -> None:
    before = {p for p in hostile.tmp.parent.rglob("*") if not p.is_relative_to(hostile.tmp)}

    @_FUZZ
    @given(batch_id=_dangerous, shape=st.sampled_from(["envelope", "flat", "batch"]))
    def check(batch_id: str, shape: str) -> None:
        payload = {
            "envelope": {
                "id": "evt_" + secrets_hex(),
                "type": "batch.completed",
                "data": {"batch_id": batch_id, "status": "completed"},
            },
            "flat": {"event": "batch.completed", "batch_id": batch_id},
            "batch": {"id": "evt_" + secrets_hex(), "type": "batch.completed", "batch": {"id": batch_id, "status": "completed"}},
        }[shape]
        r = hostile.post_signed(payload)
        safe = bool(_BATCH_ID.fullmatch(batch_id)) and ".." not in batch_id
        if safe:
            assert r.status_code == 200, (batch_id, r.text)
            hostile.signed_batches.add(batch_id)
        else:
            assert r.status_code == 400, (batch_id, r.status_code, r.text)

    check()
    # A real batch next to them is stored: the check below would see files if any were written.
    real = hostile.emulator.create_batch(items=5, status="completed")["id"]
    hostile.post_signed({"id": "evt_real", "type": "batch.completed", "data": {"batch_id": real, "status": "completed"}})
    hostile.signed_batches.add(real)
    wait_for(lambda: (hostile.storage / "manifests" / f"{real}.json").exists(), timeout=60, what="the real batch")
    time.sleep(2)  # let the worker try the others (BatchRouter does not know them: they end dead)
    for path in walk_files(hostile.storage):
        rel = path.relative_to(hostile.storage)
        assert rel.parts[0] in ("results", "errors", "manifests"), rel
        if rel.parts[0] != "manifests":
            assert rel.parts[1].startswith("dt=") and rel.parts[2].startswith("batch_id="), rel
    after = {p for p in hostile.tmp.parent.rglob("*") if not p.is_relative_to(hostile.tmp)}
    assert after == before
    # Inside the stack's own folder, only its logs, ledger, metrics and the storage root.
    for path in walk_files(hostile.tmp):
        rel = path.relative_to(hostile.tmp)
        assert rel.parts[0] in ("storage", "metrics") or rel.suffix == ".log" or rel.name.startswith("receiver.db"), rel
    hostile.assert_healthy()


def secrets_hex() -> str:
    import secrets

    return secrets.token_hex(8)


# --- artifact URLs that point inside the network ----------------------------------------------------


def test_artifact_urls_and_redirects_into_the_network_are_refused_unless_allowlisted(tmp_path: Path) -> None:
    """A hostile or broken artifact-url answer cannot make the worker fetch internal addresses."""
    from ._httpservers import Artifact, ArtifactServer, Canned, Fault, LiveServer, ScriptedServer

    body = b"".join(b'{"n":%d}\n' % i for i in range(50))
    canary = ArtifactServer({"/a.jsonl": Artifact(body)})
    origin = ArtifactServer({"/a.jsonl": Artifact(body)})
    api = ScriptedServer()
    api_key = new_api_key()
    with LiveServer(canary) as canary_srv, LiveServer(origin) as origin_srv, LiveServer(api) as api_srv:
        port = canary_srv.port
        internal = [
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "https://169.254.169.254/latest/meta-data/",
            "https://[fd00:ec2::254]/latest/meta-data/",
            f"https://localhost:{port}/a.jsonl",
            f"http://localhost:{port}/a.jsonl",
            f"https://127.0.0.2:{port}/a.jsonl",
            f"https://[::1]:{port}/a.jsonl",
            f"https://[::ffff:127.0.0.1]:{port}/a.jsonl",
            "https://10.0.0.1/a.jsonl",
            "https://172.16.5.4/a.jsonl",
            "https://192.168.1.10/a.jsonl",
            "https://100.64.0.1/a.jsonl",
            "https://0.0.0.0/a.jsonl",
            f"https://user:pw@127.0.0.1:{port}/a.jsonl",
            "file:///etc/passwd",
        ]
        cases = [(f"bat_ssrf_{i:02d}", url, None) for i, url in enumerate(internal)]
        # The artifact host itself is allowed (listed), and redirects into the network.
        cases += [(f"bat_ssrf_redirect_{i:02d}", f"{origin_srv.url}/a.jsonl", url) for i, url in enumerate(internal[:9])]
        for batch_id, url, _redirect in cases:
            api.on("GET", f"/v1/batches/{batch_id}", Canned(200, {"id": batch_id, "status": "completed", "item_count": 50}))
            api.on("GET", f"/v1/batches/{batch_id}/artifact-url", Canned(200, {"url": url}))
        env = receiver_env(tmp_path, api_srv.url, api_key, RECEIVER_ARTIFACT_HOSTS="127.0.0.1", RECEIVER_MAX_ATTEMPTS="2")
        outputs = []
        for batch_id, url, redirect in cases:
            if redirect is not None:
                origin.faults.append(Fault("redirect", status=302, location=redirect))
            done = run_cli(env, "fetch", batch_id, timeout=120)
            outputs += [done.stdout.decode(), done.stderr.decode()]
            assert done.returncode == 1, (url, redirect, done.stdout, done.stderr)
            state, reason = ledger_query(env, "SELECT state, last_error FROM jobs WHERE batch_id = ?", (batch_id,))[0]
            assert state == "dead" and reason and "UnsafeURL" in reason, (url, redirect, reason)
            assert f"{batch_id}: failed: UnsafeURL" in done.stderr.decode()
        # Nothing ever reached the canary, and nothing was stored.
        assert canary.seen == []
        assert not (tmp_path / "storage" / "manifests").exists()
        status = run_cli(env, "status")
        outputs += [status.stdout.decode(), status.stderr.decode()]
        lines = status.stdout.decode().splitlines()
        assert f"dead: {len(cases)}" in lines[1]
        assert all("UnsafeURL" in line for line in lines if line.startswith("dead: bat_"))

        # Listed, the same loopback host is fetched: the refusals above were the policy's doing.
        listed = receiver_env(tmp_path, api_srv.url, api_key, RECEIVER_ARTIFACT_HOSTS="127.0.0.1,localhost")
        api.on(
            "GET", "/v1/batches/bat_ssrf_listed", Canned(200, {"id": "bat_ssrf_listed", "status": "completed", "item_count": 50})
        )
        api.on("GET", "/v1/batches/bat_ssrf_listed/artifact-url", Canned(200, {"url": f"http://localhost:{port}/a.jsonl"}))
        done = run_cli(listed, "fetch", "bat_ssrf_listed", timeout=120)
        outputs += [done.stdout.decode(), done.stderr.decode()]
        assert done.returncode == 0, done.stderr
        assert len(canary.seen) == 1 and "Authorization" not in canary.seen[0].headers
    assert not secret_leaks([tmp_path], outputs, [api_key])
    record_figures(
        "ssrf",
        {
            "artifact_urls_refused": len(internal),
            "redirects_refused": len(cases) - len(internal),
            "connections_to_internal_canary": 0,
            "allowlisted_control_stored": True,
        },
    )

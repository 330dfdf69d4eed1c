"""A database blip costs a job nothing: PostgreSQL restarts (`pg_ctl restart -m fast`, every
connection cut) at each step of a job's life, and the batch is still stored once, downloaded once,
announced once, soon after the restart, with no traceback in any log.

One stack for the module (PostgreSQL, the emulator, gunicorn, one `receiver worker`, a notify sink),
one batch per step. The steps are hit deterministically, not by timing:

* mid-download: the emulator stalls the artifact for a few seconds after its first bytes;
* between upload and manifest: the test holds an exclusive lock on `deliveries`, so the worker's
  read of the batch's event ids waits, with the results file already at its final key;
* during the outbox write: an exclusive lock on `notifications`, so `mark_stored`'s transaction waits
  in its INSERT, with the manifest already published;

and PostgreSQL restarts while the worker waits there (the lock goes with it). A last test keeps
PostgreSQL down for longer than the lease while the results file is complete: the job stops
without a traceback, and its next attempt adopts the stored file instead of downloading it again;
another does the same for a batch with no signed download, whose results were paged through
(the job queued by hand, so the lock on `deliveries` can be set before it starts), and whose next
attempt asks for no page again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from receiver.config import Settings
from receiver.errors import JobCancelled, LeaseLost, LedgerConnectionLost
from receiver.jobs import worker as worker_module
from receiver.jobs.worker import Stop, Worker, _Running
from receiver.ledger import Ledger

from . import _postgres
from ._reliability import (
    new_api_key,
    new_secret,
    receiver_env,
    record_figures,
    register_webhook,
    start_emulator,
    start_web,
    start_worker,
    store_secret,
)
from ._sink import SECRET as NOTIFY_SECRET
from ._sink import Sink, verify
from .conftest import Emulator, Service, wait_for

LEASE_SECONDS = 6
#: Longer than the emulator's stall, so the stalled download is one request, not a resumed one.
READ_TIMEOUT_SECONDS = 10
STALL_SECONDS = 4
#: The job's read of its batch's event ids (Ledger.event_ids), which comes right after its results
#: file is committed. Housekeeping's retention picks `deliveries.event_id` too, by age: a freshly
#: started worker's first round can wait on the same lock, so the batch_id condition tells them apart.
EVENT_ID_READ = "SELECT deliveries.event_id%WHERE deliveries.batch_id"


class Folder:
    """The storage root as the tests read it: a folder (RECEIVER_STORAGE_URL a path)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def keys(self, prefix: str) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.glob(prefix + "**/*") if p.is_file())

    def read(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.exists() else None


class Bucket:
    """The storage root as the tests read it: `s3://bucket/prefix`, read with boto3."""

    def __init__(self, s3: Any, bucket: str, prefix: str) -> None:
        self.s3, self.bucket, self.prefix = s3, bucket, prefix

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        return sorted(o["Key"].removeprefix(self.prefix) for page in pages for o in page.get("Contents", []))

    def read(self, key: str) -> bytes | None:
        try:
            return bytes(self.s3.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read())
        except self.s3.exceptions.NoSuchKey:
            return None


@dataclasses.dataclass
class Rig:
    cluster: str
    database_url: str
    emulator: Emulator
    sink: Sink
    web: Service
    worker: Service
    storage: Folder | Bucket
    figures: dict[str, float] = dataclasses.field(default_factory=dict)

    def engine(self) -> sa.Engine:
        return sa.create_engine(self.database_url.replace("postgresql://", "postgresql+psycopg://"), poolclass=sa.NullPool)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        engine = self.engine()
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(sa.text(sql))]
        finally:
            engine.dispose()

    def job(self, batch_id: str) -> tuple[Any, ...] | None:
        with contextlib.suppress(sa.exc.OperationalError):
            rows = self.query(f"SELECT state, attempts FROM jobs WHERE batch_id = '{batch_id}'")
            return rows[0] if rows else None
        return None

    def new_batch(self, **spec: Any) -> str:
        spec.setdefault("items", 2_000)
        spec.setdefault("line_bytes", 256)
        return str(self.emulator.create_batch(status="processing", **spec)["id"])

    def wait_running(self, batch_id: str) -> None:
        wait_for(lambda: (self.job(batch_id) or ("",))[0] == "running", timeout=30, what=f"{batch_id} claimed")

    def results_files(self, batch_id: str) -> list[str]:
        """Every object under the batch's results folder, a local part file included."""
        return [k for k in self.storage.keys("results/") if f"/batch_id={batch_id}/" in k]

    def manifest(self, batch_id: str) -> dict[str, Any] | None:
        data = self.storage.read(f"manifests/{batch_id}.json")
        return None if data is None else dict(json.loads(data))

    def wait_stored(self, batch_id: str, since: float, step: str) -> None:
        wait_for(lambda: (self.job(batch_id) or ("",))[0] == "stored", timeout=60, what=f"{batch_id} stored")
        self.figures[f"seconds_from_outage_to_stored_{step}"] = round(time.monotonic() - since, 2)

    def assert_once(self, batch_id: str) -> None:
        """Stored once (one results file, no part file, the emulator's bytes), downloaded once,
        announced once, and nothing logged a traceback."""
        manifest = self.assert_stored_once(batch_id)
        assert manifest["files"][0]["sha256"] == self.emulator.expected(batch_id)["results"]["sha256"]
        assert self.emulator.stats()["artifact_requests"][batch_id] == 1
        self.assert_announced_once(batch_id, manifest)

    def assert_stored_once(self, batch_id: str) -> dict[str, Any]:
        """One manifest naming the one results file (no part file beside it), whose bytes are
        those the manifest gives; answers the manifest."""
        manifest = self.manifest(batch_id)
        assert manifest is not None
        [results] = self.results_files(batch_id)
        assert results.endswith("/results.jsonl")
        [entry] = manifest["files"]
        assert entry["key"] == results
        assert entry["sha256"] == hashlib.sha256(self.storage.read(results) or b"").hexdigest()
        return manifest

    def assert_announced_once(self, batch_id: str, manifest: dict[str, Any]) -> None:
        """Announced once, with the published manifest, and nothing logged a traceback."""
        wait_for(lambda: self._announced(batch_id), timeout=30, what=f"{batch_id} announced")
        time.sleep(0.5)  # a second announcement would follow the first at once
        [event] = self._announced(batch_id)
        assert event["data"] == manifest
        for service in (self.worker, self.web):
            assert "Traceback" not in service.output(), service.name

    def logged(self, batch_id: str, text: str) -> bool:
        """Whether the worker logged a line about `batch_id` that says `text` (the module's
        batches share one worker log)."""
        return any(f"job {batch_id}: " in line and text in line for line in self.worker.output().splitlines())

    def _announced(self, batch_id: str) -> list[dict[str, Any]]:
        events = [verify(r) for r in self.sink.delivered()]
        return [e for e in events if e["data"]["batch_id"] == batch_id]


@pytest.fixture(scope="module", params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_cluster: str | None) -> Iterator[Rig]:
    """The stack on a database of its own in the session's PostgreSQL cluster (which these tests
    restart and stop), storing in a folder or (`-m slow`) in S3 (moto_server), where the adoption
    reads the stored object back from the bucket."""
    if pg_cluster is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    cluster = pg_cluster
    tmp_path = tmp_path_factory.mktemp("blips")
    api_key, secret = new_api_key(), new_secret()
    with contextlib.ExitStack() as stack:
        database_url = _postgres.fresh_database(cluster)
        stack.callback(_postgres.drop_database, database_url)
        storage_env: dict[str, str] = {}
        storage: Folder | Bucket = Folder(tmp_path / "storage")
        if request.param == "s3":
            import boto3

            from ._moto import AWS_TEST_ENV, aws_test_env, moto_server

            stack.enter_context(aws_test_env())
            endpoint = stack.enter_context(moto_server())
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            s3.create_bucket(Bucket="blips")
            storage = Bucket(s3, "blips", "receiver/")
            storage_env = {"RECEIVER_STORAGE_URL": "s3://blips/receiver", "AWS_ENDPOINT_URL_S3": endpoint, **AWS_TEST_ENV}
        emulator = start_emulator(tmp_path, api_key)
        stack.callback(emulator.service.stop)
        sink = Sink().up()
        stack.callback(sink.down)
        env = receiver_env(
            tmp_path,
            emulator.url,
            api_key,
            DATABASE_URL=database_url,
            RECEIVER_LEASE_SECONDS=str(LEASE_SECONDS),
            RECEIVER_READ_TIMEOUT_SECONDS=str(READ_TIMEOUT_SECONDS),
            RECEIVER_NOTIFY_URL=sink.url,
            RECEIVER_NOTIFY_SECRET=NOTIFY_SECRET,
            **storage_env,
        )
        store_secret(env, secret)
        web = start_web(env, tmp_path)
        stack.callback(web.stop)
        register_webhook(emulator, api_key, f"http://127.0.0.1:{env['PORT']}/hooks/batchrouter", secret)
        worker = start_worker(env, tmp_path)
        stack.callback(worker.stop)
        rig = Rig(cluster, database_url, emulator, sink, web, worker, storage)
        yield rig
        record_figures(f"db_blips_{request.param}", rig.figures)


@contextlib.contextmanager
def _locked(rig: Rig, table: str) -> Iterator[Any]:
    """Hold an exclusive lock on `table` in a transaction of our own (the restart ends it); yields
    a function that waits until a statement beginning with its argument (a LIKE pattern) waits
    for the lock."""
    engine = rig.engine()
    conn = engine.connect()

    def wait_for_waiter(statement: str) -> None:
        def waiting() -> bool:
            with engine.connect() as other:
                found = other.execute(
                    sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query ILIKE :q"),
                    {"q": statement + "%"},
                ).scalar_one()
            return bool(found)

        wait_for(waiting, timeout=60, what=f"{statement!r} waiting for the lock on {table}")

    try:
        conn.execute(sa.text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        yield wait_for_waiter
    finally:
        with contextlib.suppress(sa.exc.DBAPIError):
            conn.close()
        engine.dispose()


def _downloading(rig: Rig) -> str:
    """A batch whose download is under way and stalls for a few seconds: time to set a trap for
    what the job does next (its delivery, recorded before, never meets the trap)."""
    batch_id = rig.new_batch()
    rig.emulator.fault(target="artifact", kind="stall", batch_id=batch_id, after_bytes=64 * 1024, stall_seconds=STALL_SECONDS)
    rig.emulator.complete(batch_id)
    wait_for(lambda: rig.emulator.stats()["artifact_requests"].get(batch_id), timeout=30, what="the download started")
    return batch_id


def test_restart_before_claim_stores_once(rig: Rig) -> None:
    batch_id = rig.new_batch()
    since = time.monotonic()
    _postgres.restart(rig.cluster)
    rig.emulator.complete(batch_id)  # the web side answers 503 until the ledger is back; BatchRouter retries
    rig.wait_stored(batch_id, since, "before_claim")
    rig.assert_once(batch_id)


def test_restart_mid_download_stores_once(rig: Rig) -> None:
    batch_id = _downloading(rig)
    since = time.monotonic()
    _postgres.restart(rig.cluster)
    assert rig.manifest(batch_id) is None  # the stall outlasts the restart
    rig.wait_stored(batch_id, since, "mid_download")
    rig.assert_once(batch_id)


@contextlib.contextmanager
def _uploaded_not_published(rig: Rig) -> Iterator[str]:
    """A batch whose job has uploaded its results and waits before its manifest: after the upload
    it reads the batch's event ids, and we hold an exclusive lock on `deliveries`."""
    batch_id = _downloading(rig)
    with _locked(rig, "deliveries") as wait_for_waiter:
        wait_for_waiter(EVENT_ID_READ)
        [results] = rig.results_files(batch_id)
        assert results.endswith("/results.jsonl")
        assert rig.manifest(batch_id) is None
        yield batch_id


def test_restart_between_upload_and_manifest_stores_once(rig: Rig) -> None:
    with _uploaded_not_published(rig) as batch_id:
        since = time.monotonic()
        _postgres.restart(rig.cluster)
    rig.wait_stored(batch_id, since, "between_upload_and_manifest")
    rig.assert_once(batch_id)


def test_restart_during_the_outbox_write_stores_and_announces_once(rig: Rig) -> None:
    batch_id = rig.new_batch()
    with _locked(rig, "notifications") as wait_for_waiter:
        rig.emulator.complete(batch_id)
        wait_for_waiter("INSERT INTO notifications")
        assert rig.manifest(batch_id) is not None
        assert (rig.job(batch_id) or ("",))[0] == "running"
        since = time.monotonic()
        _postgres.restart(rig.cluster)
    rig.wait_stored(batch_id, since, "during_outbox_write")
    rig.assert_once(batch_id)


def test_an_outage_longer_than_the_lease_adopts_the_stored_results(rig: Rig) -> None:
    with _uploaded_not_published(rig) as batch_id:
        since = time.monotonic()
        with _postgres.down(rig.cluster):
            # The worker retries while its lease is surely its own, then stops the job cleanly.
            wait_for(lambda: "the next worker takes it from here" in rig.worker.output(), timeout=30, what="the job stopped")
            assert rig.manifest(batch_id) is None  # stopped before its manifest: only the results file to adopt
    rig.wait_stored(batch_id, since, "outage_longer_than_lease")
    assert f"job {batch_id}: adopting results/" in rig.worker.output()
    assert rig.job(batch_id) == ("stored", 2)
    rig.assert_once(batch_id)


def test_an_outage_longer_than_the_lease_adopts_the_stored_results_pages(rig: Rig) -> None:
    """The same outage for a batch with no signed download: its next attempt adopts the file its
    results pages were written to instead of paging through the whole batch again."""
    items = 2_500  # three pages of at most 1,000 rows
    batch_id = str(rig.emulator.create_batch(status="completed", items=items, line_bytes=256, artifact_url=False)["id"])
    pages = f"/v1/batches/{batch_id}/results"
    with _locked(rig, "deliveries") as wait_for_waiter:
        # Queued as `receiver fetch` queues it: a delivery would wait for the lock, and the job with it.
        ledger = Ledger(rig.database_url)
        try:
            ledger.enqueue(batch_id)
        finally:
            ledger.close()
        # Its event-id read comes after the pages file is committed: waiting there, the file is whole.
        wait_for_waiter(EVENT_ID_READ)
        [results] = rig.results_files(batch_id)
        assert results.endswith("/results.jsonl")
        assert rig.manifest(batch_id) is None
        paged = rig.emulator.stats()["api_requests"][pages]
        assert paged == 3
        since = time.monotonic()
        with _postgres.down(rig.cluster):
            wait_for(lambda: rig.logged(batch_id, "the next worker takes it from here"), timeout=30, what="the job stopped")
            assert rig.manifest(batch_id) is None
    rig.wait_stored(batch_id, since, "outage_longer_than_lease_results_pages")
    assert rig.emulator.stats()["api_requests"][pages] == paged
    assert rig.logged(batch_id, f"adopting {results}, stored whole by an earlier attempt")
    assert rig.job(batch_id) == ("stored", 2)
    manifest = rig.assert_stored_once(batch_id)
    assert manifest["source"] == "results_pages"
    assert manifest["files"][0]["lines"] == items and manifest["counts_match"] is True
    rig.assert_announced_once(batch_id, manifest)


# --- one ledger call in a blip, stopped from another thread (no PostgreSQL needed) ---------------


@pytest.fixture
def job_in_hand(tmp_path: Path) -> Iterator[tuple[Worker, _Running]]:
    """A worker on a SQLite ledger holding a claimed job whose lease lasts an hour."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/ledger.db", storage_url=str(tmp_path / "storage"), api_key="br_test_key"
    )
    worker = Worker.from_settings(settings)
    worker.ledger.create_schema()
    worker.ledger.enqueue("bat_blip")
    job = worker.ledger.claim(worker.owner, 3600)
    assert job is not None
    yield worker, _Running(job, lease_until=time.monotonic() + 3600)
    worker.ledger.close()


@pytest.mark.parametrize(("reason", "raised"), [(Stop.SHUTDOWN, JobCancelled), (Stop.LEASE_LOST, LeaseLost)])
def test_a_stop_ends_the_wait_between_ledger_tries(
    job_in_hand: tuple[Worker, _Running], monkeypatch: pytest.MonkeyPatch, reason: Stop, raised: type[JobCancelled]
) -> None:
    """SIGTERM during a blip: the job stops at once, as at any other check, instead of sleeping out
    the backoff. The wait here is 15-30 s; a worker that slept it would try again (and get an
    answer) instead of raising."""
    monkeypatch.setattr(worker_module, "LEDGER_RETRY_BASE_SECONDS", 30.0)
    monkeypatch.setattr(worker_module, "LEDGER_RETRY_CAP_SECONDS", 30.0)
    worker, running = job_in_hand
    calls: list[int] = []
    failed = threading.Event()

    def call() -> str:
        calls.append(1)
        if len(calls) > 1:
            return "made again"
        failed.set()
        raise LedgerConnectionLost("server closed the connection unexpectedly")

    stopper = threading.Thread(target=lambda: failed.wait(60) and running.stop(reason))
    stopper.start()
    with pytest.raises(JobCancelled) as info:
        worker._ledger_call(running, call)
    stopper.join()
    assert type(info.value) is raised
    assert len(calls) == 1


def test_a_closing_ledger_call_is_not_cut_short_by_the_stop(
    job_in_hand: tuple[Worker, _Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Giving the job back is how a stopped job ends: it keeps trying through the blip."""
    monkeypatch.setattr(worker_module, "LEDGER_RETRY_BASE_SECONDS", 0.01)
    worker, running = job_in_hand
    running.stop(Stop.SHUTDOWN)
    calls: list[int] = []

    def release() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise LedgerConnectionLost("server closed the connection unexpectedly")
        worker.ledger.release(running.job.batch_id, worker.owner)

    worker._ledger_call(running, release, closing=True)
    assert len(calls) == 2
    assert (worker.ledger.job("bat_blip") or {})["state"] == "queued"

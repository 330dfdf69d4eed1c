"""A fleet, as README "Scaling out" describes it: two web instances (gunicorn, the Procfile's `web`
line) and three `receiver worker` processes, each in its own working folder, sharing one PostgreSQL
and one S3 bucket (moto_server), fed by the emulator. Meanwhile a worker is SIGKILLed mid-download
and restarted, a gunicorn worker is SIGKILLed under load, and PostgreSQL restarts.

Every worker announces what it stores to a notify sink (a consumer that refuses some attempts; the
signatures checked with the `standardwebhooks` package) and polls every few seconds. A few batches
get a progress delivery and lose their terminal one, as a lost delivery looks from here: polling
must store them, once.

Each terminal delivery goes to one web instance and a duplicate of it to the other, some at the
same instant. Answers other than 2xx (the 503s of the PostgreSQL restart) are sent again, as
BatchRouter retries them. Every batch must end stored exactly once, every 2xx'd delivery recorded,
no job left running, every batch announced with one webhook-id.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from . import _postgres
from ._reliability import (
    Delivery,
    Sender,
    children_of,
    kill,
    new_api_key,
    new_secret,
    parallel,
    progress,
    receiver_env,
    record_figures,
    signed,
    start_emulator,
    start_web,
    start_worker,
    store_secret,
)
from ._sink import SECRET as NOTIFY_SECRET
from ._sink import Sink, verify
from .conftest import wait_for

BUCKET = "fleet"
#: Short, so lost terminal deliveries are found within seconds (README "If deliveries are lost").
POLL_SECONDS = "2"


def _query(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


def _send_until_2xx(sender: Sender, deliveries: list[Delivery], counts: dict[str, int]) -> list[Any]:
    """Send, then send again whatever was not answered 2xx, as BatchRouter retries (for minutes)."""
    answered: list[Any] = []
    for _round in range(60):
        answers = sender.send(deliveries)
        answered += [a for a in answers if 200 <= a.status < 300]
        deliveries = [a.delivery for a in answers if not 200 <= a.status < 300]
        counts["answers_not_2xx"] += len(deliveries)
        if not deliveries:
            return answered
        time.sleep(1.0)
    raise AssertionError(f"{len(deliveries)} deliveries were never accepted")


class Announcements:
    """Reads the sink as events arrive, on a thread of its own: `standardwebhooks` refuses a
    timestamp older than five minutes, and a full-size run is longer than that."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.webhook_ids: dict[str, set[str]] = {}
        self.delivered: dict[str, int] = {}
        self.events: dict[str, dict[str, Any]] = {}
        self.attempts = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Announcements:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._check()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._check()

    def _check(self) -> None:
        for received in self.sink.received_since(self.attempts):
            self.attempts += 1
            try:
                event = verify(received)
            except Exception as exc:  # noqa: BLE001 - collected, asserted on by the test
                self.errors.append(f"{received.headers.get('Webhook-Id')}: {exc!r}")
                continue
            batch_id = event["data"]["batch_id"]
            self.webhook_ids.setdefault(batch_id, set()).add(received.headers["Webhook-Id"])
            if received.status == 200:
                self.delivered[batch_id] = self.delivered.get(batch_id, 0) + 1
                self.events[batch_id] = event


def run_fleet(tmp_path: Path, n_batches: int, cluster: str | None) -> dict[str, Any]:
    """The fleet against a new database in `cluster` (the session's PostgreSQL, which the run
    restarts once) and a moto_server of its own."""
    from ._moto import AWS_TEST_ENV, aws_test_env, moto_server

    rng = random.Random(f"fleet-{n_batches}")
    api_key, secret = new_api_key(), new_secret()
    counts: dict[str, int] = {"answers_not_2xx": 0}
    with contextlib.ExitStack() as stack:
        if cluster is None:
            pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
        database_url = _postgres.fresh_database(cluster)
        stack.callback(_postgres.drop_database, database_url)
        stack.enter_context(aws_test_env())
        endpoint = stack.enter_context(moto_server())
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        emulator = start_emulator(tmp_path, api_key)
        stack.callback(emulator.service.stop)
        # The consumer refuses one attempt in twenty (500): events are retried, with one webhook-id.
        sink = Sink(fail_ratio=0.05, seed=f"fleet-{n_batches}").up()
        stack.callback(sink.down)
        announcements = stack.enter_context(Announcements(sink))

        def env_for(name: str) -> dict[str, str]:
            folder = tmp_path / name  # a working folder of its own, as on a host of its own
            folder.mkdir()
            return receiver_env(
                folder,
                emulator.url,
                api_key,
                DATABASE_URL=database_url,
                RECEIVER_STORAGE_URL=f"s3://{BUCKET}/receiver",
                AWS_ENDPOINT_URL_S3=endpoint,
                RECEIVER_WORKER_CONCURRENCY="4",
                RECEIVER_MAX_ATTEMPTS="50",
                RECEIVER_POLL_SECONDS=POLL_SECONDS,
                RECEIVER_NOTIFY_URL=sink.url,
                RECEIVER_NOTIFY_SECRET=NOTIFY_SECRET,
                **AWS_TEST_ENV,
            )

        envs = {name: env_for(name) for name in ("web-a", "web-b", "worker-0", "worker-1", "worker-2")}
        store_secret(envs["web-a"], secret)
        webs = [start_web(envs[name], tmp_path / name) for name in ("web-a", "web-b")]
        workers = [start_worker(envs[f"worker-{i}"], tmp_path / f"worker-{i}", f"worker-{i}") for i in range(3)]
        for service in [*webs, *workers]:
            stack.callback(service.stop)
        hooks = [f"http://127.0.0.1:{envs[name]['PORT']}/hooks/batchrouter" for name in ("web-a", "web-b")]

        # Big enough that downloads are in flight when a worker is killed (multipart above 8 MB).
        created = parallel(
            lambda i: emulator.create_batch(
                id=f"bat_fleet_{i:05d}", items=40_000 if i % 10 == 0 else 500 + i % 97, line_bytes=256, status="processing"
            ),
            range(n_batches),
        )
        batch_ids = [b["id"] for b in created]
        senders = [Sender(hook, 16) for hook in hooks]
        # Progress deliveries make batches known, so they are polled: one in twenty (all small)
        # then loses its terminal delivery; one in ten more gets its terminal delivery, racing a poll.
        lost = {b for i, b in enumerate(batch_ids) if i % 20 == 7}
        watched = lost | {b for i, b in enumerate(batch_ids) if i % 10 == 5}
        progress_events = [progress(secret, b) for b in sorted(watched)]
        progress_answered = []
        for k in (0, 1):
            progress_answered += _send_until_2xx(senders[k], progress_events[k::2], counts)
        sent = parallel(lambda b: emulator.complete(b, deliver=False), batch_ids)
        events = [
            signed(secret, s["body"].encode(), event_id=s["event_id"], batch_id=b)
            for b, s in zip(batch_ids, sent)
            if b not in lost
        ]
        # To one instance, a duplicate to the other; every third pair at the same instant (two
        # connections of one wave), the rest in a later wave. The watched batches that keep their
        # terminal delivery get it only in the later wave, when their first poll is due: the
        # delivery and the poll race.
        first: dict[int, list[Delivery]] = {0: [], 1: []}
        later: dict[int, list[Delivery]] = {0: [], 1: []}
        for i, event in enumerate(events):
            side = rng.randrange(2)
            (later if event.batch_id in watched else first)[side].append(event)
            (first if i % 3 == 0 and event.batch_id not in watched else later)[1 - side].append(event)

        answers: list[Any] = []
        started = time.monotonic()

        def deliver(wave: dict[int, list[Delivery]]) -> None:
            results: list[list[Any]] = [[], []]
            threads = [
                threading.Thread(target=lambda k=k: results[k].extend(_send_until_2xx(senders[k], wave[k], counts)))
                for k in (0, 1)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            answers.extend(results[0] + results[1])

        deliver(first)

        # A worker killed mid-download: it holds a lease on a running job (the big batches take seconds).
        # Not while it may hold polls (a watched batch with no job yet): a dead poller's claims come
        # back only after their lease (receiver.jobs.poller.CLAIM_LEASE_SECONDS, 3 minutes), longer
        # than this test may take.
        def downloading_not_polling() -> bool:
            [(running, unpolled)] = _query(
                database_url,
                "SELECT (SELECT count(*) FROM jobs WHERE state = 'running'), "
                "(SELECT count(*) FROM known_batches k WHERE state = 'watching' "
                "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = k.batch_id))",
            )
            return running > 0 and unpolled == 0

        wait_for(downloading_not_polling, timeout=60, what="a download in flight and no poll in hand")
        workers[0].stop(signal.SIGKILL)
        counts["workers_killed"] = 1
        # The second wave goes in while PostgreSQL restarts (503s, sent again) and a gunicorn
        # worker is killed under load.
        wave = threading.Thread(target=deliver, args=(later,))
        restart = threading.Thread(target=_postgres.restart, args=(cluster,))
        restart.start()
        time.sleep(0.05)
        wave.start()
        time.sleep(0.1)
        counts["gunicorn_workers_killed"] = int(kill(children_of(webs[1].proc.pid)[0]))
        restart.join()
        counts["postgres_restarts"] = 1
        wave.join()
        workers[0].start()
        ack_seconds = time.monotonic() - started

        def settled() -> bool:
            rows = _query(database_url, "SELECT state, count(*) FROM jobs GROUP BY state")
            return dict(rows).get("stored", 0) == n_batches

        try:
            wait_for(settled, timeout=120 + n_batches, interval=1.0, what="every batch stored")
        except TimeoutError:
            raise AssertionError(_query(database_url, "SELECT state, count(*) FROM jobs GROUP BY state")) from None
        stored_seconds = time.monotonic() - started
        all_sent = [("sent", n_batches)]

        def announced() -> bool:  # the sink has them, and the senders have recorded its 2xx
            notifications = _query(database_url, "SELECT state, count(*) FROM notification_deliveries GROUP BY state")
            return set(announcements.delivered) >= set(batch_ids) and notifications == all_sent

        wait_for(
            announced,
            timeout=60 + n_batches / 5,
            interval=1.0,
            what="every batch announced",
        )
        announced_seconds = time.monotonic() - started

        # Every 2xx'd delivery recorded; every batch stored once, whole; nothing half-done anywhere.
        recorded = {r[0] for r in _query(database_url, "SELECT event_id FROM deliveries")}
        acknowledged = {json.loads(a.body)["event_id"] for a in answers}
        assert acknowledged == {e.event_id for e in events}
        assert acknowledged <= recorded
        assert len(progress_answered) == len(progress_events) and {p.event_id for p in progress_events} <= recorded
        # The lost batches: no terminal delivery recorded, found and queued by a poll.
        terminal = _query(database_url, "SELECT batch_id, event_type FROM deliveries WHERE event_type <> 'batch.progress'")
        assert [r for r in terminal if r[0] in lost] == []
        found_by_poll = {r[0] for r in _query(database_url, "SELECT batch_id FROM known_batches WHERE found_by_poll")}
        queued_by_poll = {r[0] for r in _query(database_url, "SELECT batch_id FROM jobs WHERE origin = 'poll'")}
        assert lost <= found_by_poll and lost <= queued_by_poll
        polls = _query(database_url, "SELECT coalesce(sum(polls), 0) FROM known_batches")[0][0]
        assert _query(database_url, "SELECT count(*) FROM jobs WHERE state <> 'stored'") == [(0,)]
        keys = [
            o["Key"].removeprefix("receiver/")
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="receiver/")
            for o in page.get("Contents", [])
        ]
        assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
        for batch_id in batch_ids:
            assert keys.count(f"manifests/{batch_id}.json") == 1
            results = [k for k in keys if k.startswith("results/") and f"/batch_id={batch_id}/" in k]
            assert len(results) == 1, (batch_id, results)
            manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"receiver/manifests/{batch_id}.json")["Body"].read())
            assert manifest["files"][0]["sha256"] == emulator.expected(batch_id)["results"]["sha256"]
            if batch_id in lost:
                assert manifest["event_ids"] == [], batch_id
            # Announced with what was stored (the event is the manifest, plus when).
            assert announcements.events[batch_id]["data"]["files"] == manifest["files"], batch_id
        # Every stored batch announced at least once, each under one webhook-id however often sent.
        assert announcements.errors == []
        assert set(announcements.webhook_ids) == set(batch_ids)
        assert {b: ids for b, ids in announcements.webhook_ids.items() if len(ids) != 1} == {}
        for web in webs:
            assert "Traceback" not in web.output()
        connections = _query(database_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")[0][0]
    return {
        "batches": n_batches,
        "deliveries_sent": 2 * len(events) + len(progress_events),
        "deliveries_acknowledged": len(answers) + len(progress_answered),
        "progress_deliveries": len(progress_events),
        "batches_stored": n_batches,
        "batches_terminal_delivery_lost": len(lost),
        "batches_found_by_poll": len(found_by_poll),
        "polls": polls,
        "notification_attempts": announcements.attempts,
        "notification_attempts_refused_by_sink": announcements.attempts - sum(announcements.delivered.values()),
        "batches_announced_more_than_once": sum(1 for n in announcements.delivered.values() if n > 1),
        "postgres_connections_at_end": connections,
        **counts,
        "seconds_to_acknowledge_all": round(ack_seconds, 1),
        "seconds_until_all_stored": round(stored_seconds, 1),
        "seconds_until_all_announced": round(announced_seconds, 1),
    }


def test_fleet_ci_size(tmp_path: Path, pg_cluster: str | None) -> None:
    record_figures("fleet", {**run_fleet(tmp_path, 60, pg_cluster), "scale": "ci"})


@pytest.mark.slow
def test_fleet_full_size(tmp_path: Path, pg_cluster: str | None) -> None:
    record_figures("fleet", {**run_fleet(tmp_path, 1000, pg_cluster), "scale": "full"})

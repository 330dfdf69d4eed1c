"""Notification targets beyond the webhook: SQS (standard and FIFO) and EventBridge, each tracked
and retried on its own, against moto_server over HTTP.

What moto cannot do (answer a throttling error, fail one PutEvents entry) is played by a small
scripted HTTP server speaking the services' JSON protocol (tests/_httpservers.py). The upgrade of a
ledger that already holds webhook notifications is checked here too: same webhook-id after it.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from receiver.config import NotifySettings, Settings, WorkerSettings
from receiver.jobs.notifier import Notifier
from receiver.ledger import Ledger
from receiver.ledger.migrate import _config
from receiver.manifest import Manifest, StoredFile
from receiver.metrics import render
from receiver.storage.s3.client import make_client

from ._httpservers import Canned, LiveServer, ScriptedServer
from ._moto import aws_test_env
from ._s3servers import S3Endpoint
from ._sink import SECRET, Sink, verify
from .conftest import Service, make_receiver_env, read_manifest, run_cli, wait_for

ACCOUNT = "123456789012"


@pytest.fixture
def aws(moto_s3: S3Endpoint) -> Iterator[str]:
    """The session's moto_server, with boto3 pointed at it for SQS and EventBridge, for the test."""
    with moto_s3.environment(AWS_ENDPOINT_URL_SQS=moto_s3.url, AWS_ENDPOINT_URL_EVENTBRIDGE=moto_s3.url):
        yield moto_s3.url


@pytest.fixture
def sqs(aws: str) -> Any:
    return make_client("sqs", endpoint_url=aws, max_attempts=1)


def _manifest(batch_id: str) -> Manifest:
    key = f"results/dt=2026-01-02/batch_id={batch_id}/results.jsonl"
    return Manifest(
        batch_id, "completed", (StoredFile(key, 10, "ab" * 32, 2),), dt.datetime.now(dt.UTC), ("evt_1",), "artifact", 2, {}
    )


def _stored(tmp_path: Path, batch_id: str, targets: tuple[str, ...]) -> Ledger:
    ledger = Ledger(f"sqlite:///{tmp_path}/receiver.db")
    ledger.create_schema()
    ledger.enqueue(batch_id)
    assert ledger.claim("w", 30, batch_id=batch_id) is not None
    assert ledger.mark_stored(batch_id, "w", _manifest(batch_id), notify=targets)
    return ledger


def _settings(*, retry_cap_seconds: float = 0.2, **notify: Any) -> Settings:
    """Quick retries and a short lease; `notify` sets the targets (NotifySettings' fields)."""
    quick = WorkerSettings(
        retry_base_seconds=0.05, retry_cap_seconds=retry_cap_seconds, lease_seconds=2.0, connect_timeout_seconds=3.0
    )
    return Settings(notify=NotifySettings(**notify), worker=quick)


def _settle(notifier: Notifier, batch_id: str, timeout: float = 30.0) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        notifier.send_one()
        row = notifier.ledger.notification(batch_id, notifier.target)
        return row if row and row["state"] != "pending" else None

    return wait_for(settled, timeout=timeout, interval=0.05, what=f"{batch_id}'s {notifier.target} delivery to settle")


def _queue(sqs: Any, fifo: bool = False) -> str:
    name = f"batches-{uuid.uuid4().hex[:8]}" + (".fifo" if fifo else "")
    attributes = {"FifoQueue": "true"} if fifo else {}
    return sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]


def _receive(sqs: Any, queue_url: str, wait: int = 1) -> list[dict[str, Any]]:
    return sqs.receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=10,
        WaitTimeSeconds=wait,
        MessageAttributeNames=["All"],
        MessageSystemAttributeNames=["All"],
    ).get("Messages", [])


# --- SQS ------------------------------------------------------------------------------------------------


def test_a_standard_queue_gets_the_event_with_its_id_as_the_webhook_id_attribute(tmp_path: Path, sqs: Any) -> None:
    queue_url = _queue(sqs)
    ledger = _stored(tmp_path, "b_1", ("sqs",))
    row = _settle(Notifier(_settings(sqs_url=queue_url), ledger, "n1", "sqs"), "b_1")
    assert row["state"] == "sent" and row["attempts"] == 1
    [message] = _receive(sqs, queue_url)
    event = json.loads(message["Body"])
    assert message["Body"].encode() == row["body"]
    assert event["type"] == "batch.stored" and event["data"]["batch_id"] == "b_1"
    assert message["MessageAttributes"]["webhook-id"] == {"StringValue": row["webhook_id"], "DataType": "String"}


def test_a_fifo_queue_deduplicates_on_the_event_id_and_groups_by_batch(tmp_path: Path, sqs: Any) -> None:
    queue_url = _queue(sqs, fifo=True)
    ledger = _stored(tmp_path, "b_1", ("sqs",))
    notifier = Notifier(_settings(sqs_url=queue_url), ledger, "n1", "sqs")
    first = _settle(notifier, "b_1")
    assert ledger.replay_notification("b_1", ("sqs",))  # a resend inside SQS's 5-minute window
    again = _settle(notifier, "b_1")
    assert first["state"] == again["state"] == "sent" and again["webhook_id"] == first["webhook_id"]
    [message] = _receive(sqs, queue_url)  # SQS dropped the second copy
    assert message["Attributes"]["MessageDeduplicationId"] == first["webhook_id"]
    assert message["Attributes"]["MessageGroupId"] == "b_1"
    assert message["MessageAttributes"]["webhook-id"]["StringValue"] == first["webhook_id"]


def test_a_missing_queue_keeps_the_event_pending_until_the_queue_exists(tmp_path: Path, sqs: Any, aws: str) -> None:
    name = f"later-{uuid.uuid4().hex[:8]}"
    queue_url = f"{aws}/{ACCOUNT}/{name}"
    ledger = _stored(tmp_path, "b_1", ("sqs",))
    notifier = Notifier(_settings(sqs_url=queue_url, retry_cap_seconds=0.05), ledger, "n1", "sqs")
    wait_for(lambda: notifier.send_one() and ledger.notification("b_1", "sqs")["attempts"] >= 3, timeout=20, interval=0.05)
    row = ledger.notification("b_1", "sqs")
    assert row["state"] == "pending"
    assert "does not exist" in row["last_error"] and "RECEIVER_NOTIFY_SQS_URL" in row["last_error"]
    sqs.create_queue(QueueName=name)
    row = _settle(notifier, "b_1")
    assert row["state"] == "sent"
    [message] = _receive(sqs, queue_url)
    assert message["MessageAttributes"]["webhook-id"]["StringValue"] == row["webhook_id"]


def _scripted(target: str, *answers: Canned) -> tuple[ScriptedServer, LiveServer]:
    """A server speaking an AWS JSON protocol that answers POST / with `answers` in turn."""
    script = ScriptedServer()
    script.on("POST", "/", *answers)
    return script, LiveServer(script)


def _aws_json(status: int, body: dict[str, Any]) -> Canned:
    return Canned(status, json.dumps(body).encode(), headers={"Content-Type": "application/x-amz-json-1.0"})


def test_throttling_is_retried_with_backoff_until_sqs_takes_the_message(tmp_path: Path) -> None:
    throttled = _aws_json(400, {"__type": "com.amazonaws.sqs#RequestThrottled", "message": "Rate exceeded"})
    script, server = _scripted("sqs", throttled, throttled, _aws_json(200, {"MessageId": "m-1", "MD5OfMessageBody": "x"}))
    with server, aws_test_env(AWS_ENDPOINT_URL_SQS=server.url):
        ledger = _stored(tmp_path, "b_1", ("sqs",))
        notifier = Notifier(_settings(sqs_url=f"{server.url}/{ACCOUNT}/batches"), ledger, "n1", "sqs")
        assert notifier.send_one()
        row = ledger.notification("b_1", "sqs")
        assert row["state"] == "pending" and "RequestThrottled" in row["last_error"]
        row = _settle(notifier, "b_1")
    assert row["state"] == "sent" and row["attempts"] == 3
    sent = [json.loads(seen.body) for seen in script.seen]
    assert len(sent) == 3 and all(s["MessageBody"].encode() == row["body"] for s in sent)  # one request per attempt
    assert {s["MessageAttributes"]["webhook-id"]["StringValue"] for s in sent} == {row["webhook_id"]}


# --- EventBridge ----------------------------------------------------------------------------------------


def test_put_events_reaches_a_rule_that_targets_an_sqs_queue(tmp_path: Path, sqs: Any, aws: str) -> None:
    events = make_client("events", endpoint_url=aws, max_attempts=1)
    bus = f"receiver-{uuid.uuid4().hex[:8]}"
    bus_arn = events.create_event_bus(Name=bus)["EventBusArn"]
    queue_url = _queue(sqs)
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    pattern = {"source": ["batchrouter-receiver"], "detail-type": ["batch.stored"]}
    events.put_rule(Name="stored", EventBusName=bus, EventPattern=json.dumps(pattern))
    events.put_targets(Rule="stored", EventBusName=bus, Targets=[{"Id": "queue", "Arn": queue_arn}])

    ledger = _stored(tmp_path, "b_1", ("eventbridge",))
    row = _settle(Notifier(_settings(event_bus=bus_arn), ledger, "n1", "eventbridge"), "b_1")
    assert row["state"] == "sent"
    [message] = wait_for(lambda: _receive(sqs, queue_url), timeout=10, what="the rule's message")
    delivered = json.loads(message["Body"])
    assert delivered["source"] == "batchrouter-receiver" and delivered["detail-type"] == "batch.stored"
    assert delivered["detail"] == json.loads(row["body"])


def test_a_failed_put_events_entry_is_retried(tmp_path: Path) -> None:
    failed = {"FailedEntryCount": 1, "Entries": [{"ErrorCode": "ThrottlingException", "ErrorMessage": "Rate exceeded"}]}
    script, server = _scripted(
        "events", _aws_json(200, failed), _aws_json(200, {"FailedEntryCount": 0, "Entries": [{"EventId": "e-1"}]})
    )
    with server, aws_test_env(AWS_ENDPOINT_URL_EVENTBRIDGE=server.url):
        ledger = _stored(tmp_path, "b_1", ("eventbridge",))
        notifier = Notifier(_settings(event_bus="receiver"), ledger, "n1", "eventbridge")
        assert notifier.send_one()
        row = ledger.notification("b_1", "eventbridge")
        assert row["state"] == "pending" and "ThrottlingException" in row["last_error"]
        row = _settle(notifier, "b_1")
    assert row["state"] == "sent" and row["attempts"] == 2
    entries = [json.loads(seen.body)["Entries"] for seen in script.seen]
    assert [len(e) for e in entries] == [1, 1]
    assert {e[0]["Detail"] for e in entries} == {row["body"].decode()}
    assert entries[0][0]["EventBusName"] == "receiver" and entries[0][0]["DetailType"] == "batch.stored"


# --- targets side by side ---------------------------------------------------------------------------------


def test_each_target_is_tracked_replayed_and_counted_on_its_own(tmp_path: Path, sqs: Any, aws: str) -> None:
    queue_url = _queue(sqs)
    sink = Sink()  # the webhook consumer is down
    ledger = _stored(tmp_path, "b_1", ("webhook", "sqs"))
    settings = _settings(url=sink.url, secret=SECRET, sqs_url=queue_url, retry_seconds=0.5)
    assert _settle(Notifier(settings, ledger, "n1", "sqs"), "b_1")["state"] == "sent"
    assert _settle(Notifier(settings, ledger, "n1", "webhook"), "b_1")["state"] == "failed"
    deliveries = ledger.notification_deliveries("b_1")
    assert {t: d["state"] for t, d in deliveries.items()} == {"webhook": "failed", "sqs": "sent"}
    assert len({d["webhook_id"] for d in deliveries.values()}) == 1
    text = render(ledger.stats)
    assert b'receiver_notifications_failed{target="webhook"} 1.0' in text
    assert b'receiver_notifications_failed{target="sqs"} 0.0' in text

    env = make_receiver_env(
        tmp_path,
        "http://127.0.0.1:9",
        RECEIVER_NOTIFY_URL=sink.url,
        RECEIVER_NOTIFY_SECRET=SECRET,
        RECEIVER_NOTIFY_SQS_URL=queue_url,
        AWS_ENDPOINT_URL_SQS=aws,
    )
    status = run_cli(env, "status").stdout.decode()
    assert "  webhook: pending 0  sent 0  failed 1" in status and "  sqs: pending 0  sent 1  failed 0" in status
    assert "notification failed: b_1 to webhook" in status
    out = run_cli(env, "notify", "--replay", "b_1", "--target", "webhook")
    assert out.returncode == 0, out.stderr
    deliveries = ledger.notification_deliveries("b_1")
    assert {t: d["state"] for t, d in deliveries.items()} == {"webhook": "pending", "sqs": "sent"}
    sink.up()
    try:
        assert _settle(Notifier(settings, ledger, "n2", "webhook"), "b_1")["state"] == "sent"
    finally:
        sink.down()
    assert verify(sink.delivered()[0])["data"]["batch_id"] == "b_1"
    assert len(_receive(sqs, queue_url)) == 1  # the SQS copy was not sent again


def test_a_target_added_later_gets_its_first_delivery_on_replay(tmp_path: Path, sqs: Any, aws: str) -> None:
    queue_url = _queue(sqs)
    ledger = _stored(tmp_path, "b_1", ("webhook",))
    env = make_receiver_env(
        tmp_path,
        "http://127.0.0.1:9",
        RECEIVER_NOTIFY_URL="https://jobs.example.com/hooks",
        RECEIVER_NOTIFY_SECRET=SECRET,
        RECEIVER_NOTIFY_SQS_URL=queue_url,
    )
    out = run_cli(env, "notify", "--replay", "b_1", "--target", "sqs")
    assert out.returncode == 0, out.stderr
    assert set(ledger.notification_deliveries("b_1")) == {"webhook", "sqs"}
    assert _settle(Notifier(_settings(sqs_url=queue_url), ledger, "n1", "sqs"), "b_1")["state"] == "sent"
    out = run_cli({**env, "RECEIVER_NOTIFY_SQS_URL": ""}, "notify", "--replay", "b_1", "--target", "sqs")
    assert out.returncode == 2 and b"sqs is not set" in out.stderr


@pytest.mark.parametrize(
    "variable, value, problem",
    [
        ("RECEIVER_NOTIFY_SQS_URL", "https://sqs.us-east-1.amazonaws.com/batches", "must be a queue URL"),
        ("RECEIVER_NOTIFY_SQS_URL", "http://sqs.us-east-1.amazonaws.com/123456789012/batches", "plain http only on loopback"),
        ("RECEIVER_NOTIFY_EVENT_BUS", "arn:aws:sqs:us-east-1:123456789012:batches", "must be a bus name"),
        ("RECEIVER_NOTIFY_EVENT_BUS", "my bus", "must be a bus name"),
    ],
)
def test_bad_target_settings_stop_with_one_line(tmp_path: Path, variable: str, value: str, problem: str) -> None:
    out = run_cli(make_receiver_env(tmp_path, "http://127.0.0.1:9", **{variable: value}), "worker", timeout=30)
    assert out.returncode == 2
    err = out.stderr.decode().strip()
    assert f"{variable}: " in err and problem in err and len(err.splitlines()) == 1


def test_the_worker_announces_a_stored_batch_to_sqs_and_eventbridge(emulator, web, secret, tmp_path, sqs, aws) -> None:
    queue_url = _queue(sqs)
    events = make_client("events", endpoint_url=aws, max_attempts=1)
    bus = f"receiver-{uuid.uuid4().hex[:8]}"
    events.create_event_bus(Name=bus)
    bus_queue = _queue(sqs)
    bus_queue_arn = sqs.get_queue_attributes(QueueUrl=bus_queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="stored", EventBusName=bus, EventPattern=json.dumps({"detail-type": ["batch.stored"]}))
    events.put_targets(Rule="stored", EventBusName=bus, Targets=[{"Id": "queue", "Arn": bus_queue_arn}])
    env = make_receiver_env(
        tmp_path,
        emulator.url,
        RECEIVER_NOTIFY_SQS_URL=queue_url,
        RECEIVER_NOTIFY_EVENT_BUS=bus,
        AWS_ENDPOINT_URL_SQS=aws,
        AWS_ENDPOINT_URL_EVENTBRIDGE=aws,
    )
    worker = Service("worker", [sys.executable, "-m", "receiver", "worker"], env, tmp_path).start()
    try:
        batch_id = emulator.create_batch(items=20, status="processing")["id"]
        emulator.complete(batch_id)
        [message] = wait_for(lambda: _receive(sqs, queue_url), timeout=60, what="the SQS message")
        [routed] = wait_for(lambda: _receive(sqs, bus_queue), timeout=30, what="the EventBridge event")
    finally:
        worker.stop()
    manifest = read_manifest(tmp_path / "storage", batch_id)
    assert json.loads(message["Body"])["data"] == manifest
    assert json.loads(routed["Body"])["detail"]["data"] == manifest
    ids = {
        message["MessageAttributes"]["webhook-id"]["StringValue"],
        Ledger(env["DATABASE_URL"]).notification(batch_id, "sqs")["webhook_id"],
    }
    assert len(ids) == 1


ADMIN_TOKEN = "admin-token-" + "y" * 20


@pytest.fixture
def receiver_env(tmp_path: Path, emulator) -> dict[str, str]:
    """The web process of these tests serves the status page too."""
    return make_receiver_env(tmp_path, emulator.url, RECEIVER_ADMIN_TOKEN=ADMIN_TOKEN)


def test_the_status_page_shows_and_replays_each_target_on_its_own(web, receiver_env) -> None:
    import re

    import requests

    ledger = Ledger(receiver_env["DATABASE_URL"])
    ledger.enqueue("bat_told", origin="fetch")
    ledger.add_notification("bat_told", _manifest("bat_told"), ("webhook", "sqs"))
    for target, error in (("webhook", "HTTP 500"), ("sqs", "SQS queue … does not exist")):
        assert ledger.claim_notification("w1", 30, target=target) is not None
        ledger.notification_failed("bat_told", "w1", error, retry_at=None, target=target)
    auth = ("alice", ADMIN_TOKEN)
    overview = requests.get(f"{web.url}/admin", auth=auth, timeout=10).text
    assert ">bat_told</a></td><td>sqs</td>" in overview and ">bat_told</a></td><td>webhook</td>" in overview
    page = requests.get(f"{web.url}/admin/jobs/bat_told", auth=auth, timeout=10).text
    assert 'id="notification-webhook"' in page and 'id="notification-sqs"' in page and "does not exist" in page
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None
    replayed = requests.post(
        f"{web.url}/admin/jobs/bat_told/replay", data={"csrf_token": csrf.group(1), "target": "sqs"}, auth=auth, timeout=10
    )
    assert replayed.status_code == 200 and 'id="replayed-notice"' in replayed.text
    states = {t: d["state"] for t, d in ledger.notification_deliveries("bat_told").items()}
    assert states == {"webhook": "failed", "sqs": "pending"}
    assert "replayed the notification of batch bat_told to sqs" in web.service.output()
    unknown = requests.post(
        f"{web.url}/admin/jobs/bat_told/replay", data={"csrf_token": csrf.group(1), "target": "sns"}, auth=auth, timeout=10
    )
    assert unknown.status_code == 404
    ledger.close()


# --- the upgrade -----------------------------------------------------------------------------------------


def test_webhook_notifications_in_a_ledger_upgrade_as_the_webhook_target(db_url: str) -> None:
    """A ledger at revision 0003 (one row per event, its state in the row) upgrades: every event
    keeps its webhook-id and body, its state becomes the `webhook` target's, and a pending one is
    still sent."""
    _upgrade_old_notifications(db_url)


def _upgrade_old_notifications(url: str) -> None:
    from alembic import command

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        command.upgrade(_config(conn), "0003")
        rows = [
            ("b_sent", "msg_sent", "sent", 1, None, 5.0),
            ("b_pending", "msg_pending", "pending", 3, "HTTP 503", None),
            ("b_failed", "msg_failed", "failed", 40, "HTTP 500", None),
        ]
        for batch_id, webhook_id, state, attempts, error, sent_at in rows:
            conn.execute(
                sa.text(
                    "INSERT INTO notifications (batch_id, webhook_id, body, state, attempts, next_attempt_at, retry_from,"
                    " last_error, created_at, sent_at) VALUES (:b, :w, :body, :s, :a, 1.0, 1.0, :e, 1.0, :t)"
                ),
                {
                    "b": batch_id,
                    "w": webhook_id,
                    "body": f'{{"id":"{batch_id}"}}'.encode(),
                    "s": state,
                    "a": attempts,
                    "e": error,
                    "t": sent_at,
                },
            )
    engine.dispose()
    ledger = Ledger(url)
    assert ledger.create_schema() == "0003"
    for batch_id, webhook_id, state, attempts, error, sent_at in rows:
        row = ledger.notification(batch_id, "webhook")
        assert row is not None and set(ledger.notification_deliveries(batch_id)) == {"webhook"}
        assert (row["webhook_id"], row["state"], row["attempts"], row["last_error"], row["sent_at"]) == (
            webhook_id,
            state,
            attempts,
            error,
            sent_at,
        )
        assert row["body"] == f'{{"id":"{batch_id}"}}'.encode()
    sink = Sink().up()
    try:
        settings = _settings(url=sink.url, secret=SECRET)
        assert _settle(Notifier(settings, ledger, "n1"), "b_pending")["state"] == "sent"
    finally:
        sink.down()
    [received] = sink.delivered()
    assert received.headers["Webhook-Id"] == "msg_pending"
    ledger.close()

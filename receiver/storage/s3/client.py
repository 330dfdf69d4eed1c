"""The boto3 S3 client the storage uses: retries, timeouts and a pool sized for streaming uploads."""

from __future__ import annotations

from typing import Any

import boto3
import botocore.session
from botocore.config import Config

#: Client defaults. Several writers (RECEIVER_WORKER_CONCURRENCY) share one client, each with up to
#: DEFAULT_CONCURRENCY part uploads, so botocore's pool of 10 connections would thrash.
MAX_POOL_CONNECTIONS = 64
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
#: Attempts per request, the first included: botocore "standard" retry mode, exponential backoff with
#: jitter, capped at 20 s a wait. A part is retried in place; failing the writer instead would
#: restart the whole artifact.
MAX_ATTEMPTS = 8
#: The readiness probe's client: one attempt, short timeouts, so /readyz answers well within a load
#: balancer's health-check timeout (and gunicorn's 30 s) while S3 is down, instead of retrying.
PROBE_TIMEOUT = 3.0


def make_client(
    service: str = "s3",
    *,
    endpoint_url: str | None = None,
    region_name: str | None = None,
    checksum: bool = True,
    max_attempts: int | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    max_pool_connections: int = MAX_POOL_CONNECTIONS,
) -> Any:
    """An S3 client configured from the standard environment (credentials chain, AWS_REGION,
    AWS_ENDPOINT_URL_S3, ~/.aws/config), with the retries, timeouts and pool a streaming upload needs.
    Another `service` (`sqs`, `events`: the notification senders) gets the same session rules and
    its own AWS_ENDPOINT_URL_<SERVICE>.

    Its own Session: boto3's default session is not thread-safe to create clients from. With
    `checksum=False` the client also stops botocore's default CRC32 checksums (botocore >= 1.36 sends
    them "when_supported"), which some S3-compatible stores reject like the SHA-256 ones.

    Attempts per request, the first one included: `max_attempts`, else the standard AWS_MAX_ATTEMPTS
    (or `max_attempts` in ~/.aws/config), else MAX_ATTEMPTS. They go to botocore as
    `total_max_attempts`, which means what AWS_MAX_ATTEMPTS means; botocore's `retries`
    `max_attempts` counts the retries after the first attempt, one more request than asked for.

    The client is typed `Any`: boto3 builds its classes at run time and ships no stubs.
    """
    core = botocore.session.get_session()
    if max_attempts is None:
        max_attempts = core.get_config_variable("max_attempts") or MAX_ATTEMPTS
    options: dict[str, Any] = {
        "retries": {"mode": "standard", "total_max_attempts": max_attempts},
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "max_pool_connections": max_pool_connections,
        "tcp_keepalive": True,
    }
    if not checksum:
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    session = boto3.session.Session(botocore_session=core)
    return session.client(service, endpoint_url=endpoint_url, region_name=region_name, config=Config(**options))

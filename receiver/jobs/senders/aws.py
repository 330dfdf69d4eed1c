"""The boto3 clients of the SQS and EventBridge senders, and their errors mapped onto ours.

Clients come from the storage's factory (one session per client, the standard credential chain,
AWS_REGION, AWS_ENDPOINT_URL_SQS / AWS_ENDPOINT_URL_EVENTBRIDGE) with botocore's own retries off:
the outbox retries with its backoff and records every attempt, so a throttled send shows in
`receiver status` instead of hiding inside botocore.

Nothing an operator can fix is final: a missing queue or bus, a denied permission or missing
credentials keep the event pending with an error that says what to fix, and it is sent once they are
fixed (within the retry window; `notify --replay` after it). Only a request the service calls
malformed (a body over its size limit, an invalid parameter) is rejected for good.
"""

from __future__ import annotations

import re
from typing import Any

import botocore.exceptions

from ...errors import NotifyError, NotifyRejected, NotifyTransient
from ...storage.s3.client import make_client

#: Throttling codes (botocore's retry handler's list, botocore/retries/standard.py, plus SQS's own).
THROTTLING = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "AWS.SimpleQueueService.RequestThrottled",
    }
)
#: The target is missing: SQS (https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_SendMessage.html)
#: and EventBridge (https://docs.aws.amazon.com/eventbridge/latest/APIReference/API_PutEvents.html).
MISSING = frozenset(
    {"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue", "NonExistentQueue", "ResourceNotFoundException"}
)
#: The credentials are missing, wrong, expired or not allowed to send (IAM, a KMS key policy).
DENIED = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "KmsAccessDenied",
        "KMS.AccessDeniedException",
        "NotAuthorized",
    }
)
#: Service-side faults that a later attempt may not meet.
INTERNAL = frozenset({"InternalError", "InternalFailure", "InternalException", "ServiceUnavailable", "KmsThrottled"})
#: A region in an SQS queue URL's host (sqs.<region>.amazonaws.com, or the legacy <region>.queue.amazonaws.com).
_SQS_REGION = re.compile(r"(?:sqs\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?|([a-z0-9-]+)\.queue\.amazonaws\.com(?:\.cn)?)$")


def client(service: str, region_name: str | None = None, *, timeout: float = 10.0) -> Any:
    """A boto3 client for `service` with one attempt per call and short timeouts."""
    try:
        return make_client(service, region_name=region_name, max_attempts=1, connect_timeout=timeout, read_timeout=timeout)
    except botocore.exceptions.NoRegionError:
        raise NotifyTransient(f"no AWS region for {service}: set AWS_REGION (or use the queue URL / bus ARN form)") from None


def region_of_queue(url: str) -> str | None:
    """The region an SQS queue URL names in its host, if any (a local endpoint names none)."""
    from urllib.parse import urlsplit

    match = _SQS_REGION.search(urlsplit(url).hostname or "")
    return (match.group(1) or match.group(2)) if match else None


def region_of_arn(arn: str) -> str | None:
    parts = arn.split(":")
    return parts[3] if len(parts) > 5 and parts[0] == "arn" and parts[3] else None


def translate(exc: Exception, target: str, fix: str) -> NotifyError:
    """One of our errors for what boto3 raised while sending to `target`; `fix` says what an
    operator grants or creates when the target is missing or the call is denied."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")).strip()[:300]
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return classify(code, message, target, fix, status=status)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return NotifyTransient(f"{target}: no AWS credentials found (an instance role, AWS_PROFILE or AWS_ACCESS_KEY_ID)")
    if isinstance(exc, botocore.exceptions.BotoCoreError):  # connection refused, reset, timeout, DNS
        return NotifyTransient(f"{target}: {type(exc).__name__}: {exc}"[:500])
    raise exc


def classify(code: str, message: str, target: str, fix: str, *, status: int = 0) -> NotifyError:
    """Transient or rejected from an AWS error code (a ClientError, or a failed PutEvents entry)."""
    said = f"{code}: {message}" if message else code
    if code in MISSING:
        return NotifyTransient(f"{target} does not exist ({said}); {fix}")
    if code in DENIED or status in (401, 403):
        return NotifyTransient(f"{target} refused our credentials ({said}); {fix}")
    if code in THROTTLING or code in INTERNAL or status >= 500 or status == 0 or status in (408, 429):
        return NotifyTransient(f"{target}: {said}")
    return NotifyRejected(f"{target} rejected the event ({said})")

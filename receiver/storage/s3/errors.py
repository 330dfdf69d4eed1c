"""botocore's exceptions translated into the StorageError family the worker and /readyz act on.

A permission error names the bucket, the prefix and the IAM action refused, so an operator can fix
the policy from the message alone; an outage is StorageUnavailable (retried later), anything else a
plain StorageError.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ...errors import ObjectNotFound, StorageError, StoragePermissionError, StorageUnavailable

__all__ = ["Translate", "error_code", "error_status", "translate", "translating"]

#: `translate` with the bucket bound: (exception, S3 operation, storage key or None) -> our error.
Translate = Callable[[Exception, str, "str | None"], StorageError]

#: The IAM action an S3 operation is authorised as (Service Authorization Reference, Amazon S3).
_IAM_ACTIONS = {
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "ListParts": "s3:ListMultipartUploadParts",
    "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject",
    "DeleteObject": "s3:DeleteObject",
    "ListObjectsV2": "s3:ListBucket",
    "HeadBucket": "s3:ListBucket",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
}

#: Error codes an operator must fix (credentials, policy, bucket name, region).
_PERMISSION_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AccountProblem",
        "InvalidSecurity",
        "NotSignedUp",
        "AuthorizationHeaderMalformed",
        "PermanentRedirect",
        "InvalidBucketName",
        "NoSuchBucket",
    }
)
#: Error codes that clear up by themselves (S3 Error Responses; "SlowDown" is S3's 503 throttle).
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "BadDigest",
        "XAmzContentSHA256Mismatch",
        "IncompleteBody",
        "OperationAborted",
        "NoSuchUpload",
        "ConditionalRequestConflict",
        "KMS.ThrottlingException",
        "KMS.KMSInternalException",
        "KMS.DependencyTimeoutException",
    }
)


def translate(exc: Exception, operation: str, key: str | None = None, *, bucket: str, prefix: str, url: str) -> StorageError:
    """The named error for a botocore failure of `operation` (an S3 API name) on `key`, a key of the
    storage root `url` (`prefix` in `bucket`)."""
    action = _IAM_ACTIONS.get(operation, f"s3:{operation}")
    where = f"bucket {bucket} prefix {prefix or '(bucket root)'}"
    if isinstance(exc, ClientError):
        code, status = error_code(exc), error_status(exc)
        message = str(exc.response.get("Error", {}).get("Message") or "")[:300]
        detail = f"{code}: {message}" if message else (code or f"HTTP {status}")
        if code in ("NoSuchKey", "404") or (status == 404 and not code):
            return ObjectNotFound(f"{key or 'the object'} does not exist in {url}")
        if code == "NoSuchBucket":
            return StoragePermissionError(
                f"{action} failed: bucket {bucket} does not exist (prefix {prefix or '(bucket root)'}); "
                "create it or fix RECEIVER_STORAGE_URL"
            )
        if code in _TRANSIENT_CODES or (status or 0) >= 500:
            return StorageUnavailable(f"S3 unavailable: {action} on {where} failed ({detail})")
        if code in _PERMISSION_CODES or code.startswith("KMS.") or status == 403:
            return StoragePermissionError(f"{action} denied on {where} ({detail})")
        return StorageError(f"{action} on {where} failed ({detail})")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StoragePermissionError(
            f"{action} denied on {where}: no usable AWS credentials ({exc}); "
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or give the process a role"
        )
    if isinstance(exc, (HTTPClientError, BotoConnectionError, CredentialRetrievalError, IncompleteReadError)):
        return StorageUnavailable(f"S3 unreachable: {action} on {where} failed ({exc})")
    return StorageError(f"{action} on {where} failed ({exc})")


@contextlib.contextmanager
def translating(translate: Translate, operation: str, key: str | None = None) -> Iterator[None]:
    """Raise botocore's exceptions inside the block as `translate` names them."""
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, operation, key) from exc


def error_code(exc: ClientError) -> str:
    """S3's error code ("NoSuchKey", "SlowDown", …), or "" when the response had none."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def error_status(exc: ClientError) -> int | None:
    """The HTTP status of the failed response, when there was one."""
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")

"""A storage root in an S3 bucket (`s3://bucket/prefix`), or any S3-compatible store.

A writer streams into a multipart upload straight from the download: no temporary file, and no more
memory than a configured budget, whatever the artifact's size. S3's limits shape it (S3 User Guide,
"Amazon S3 multipart upload limits"): parts of 5 MiB to 5 GiB (the last may be smaller), at most
10,000 parts, objects up to 5 TiB. An object exists only once CompleteMultipartUpload returns, so a
reader never sees a partial results file; every failure aborts the upload so no parts linger (and
are billed) after it.

boto3's managed transfer (`upload_fileobj`) is not used: on a non-seekable stream it buffers about
15 parts regardless of any budget (see docs/benchmarks.md), and it cannot start before it knows the
object is small enough for a single PutObject. The writer here does the part bookkeeping itself in a
few lines, the way s3transfer's `UploadSubmissionTask` does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
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

from ..errors import ObjectNotFound, ObjectTooLarge, StorageError, StoragePermissionError, StorageUnavailable
from .base import Storage, Writer

__all__ = ["S3Storage", "S3Writer", "make_client", "part_size_for"]

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

#: S3 multipart upload limits (S3 User Guide, "Amazon S3 multipart upload limits").
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * TiB

#: s3transfer's default `multipart_chunksize`; S3 suggests 8-16 MiB parts for throughput.
DEFAULT_PART_SIZE = 8 * MiB
#: Two 8 MiB parts in flight and one filling: as fast as 64 MiB against moto_server, a third of the
#: memory (BENCHMARKS.md, "Streaming to S3").
DEFAULT_BUFFER_BYTES = 24 * MiB
#: Part uploads in flight per writer at most (the memory budget usually binds first).
DEFAULT_CONCURRENCY = 8
#: Without a size hint the part size doubles every this many parts: 8 MiB x 1000, 16 MiB x 1000, …
#: 4 GiB x 1000 holds 7.99 TiB within 10,000 parts, above S3's 5 TiB object limit.
PARTS_PER_TIER = 1000

#: Client defaults. Several writers (RECEIVER_WORKER_CONCURRENCY) share one client, each with up to
#: DEFAULT_CONCURRENCY part uploads, so botocore's pool of 10 connections would thrash.
MAX_POOL_CONNECTIONS = 64
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
#: botocore "standard" retry mode: exponential backoff with jitter, capped at 20 s a wait. A part is
#: retried in place; failing the writer instead would restart the whole artifact.
MAX_ATTEMPTS = 8
#: How long abort() waits for part uploads already on the wire before AbortMultipartUpload.
ABORT_WAIT_SECONDS = 30.0
#: The readiness probe's client: one attempt, short timeouts, so /readyz answers well within a load
#: balancer's health-check timeout (and gunicorn's 30 s) while S3 is down, instead of retrying.
PROBE_TIMEOUT = 3.0
#: Blocks yielded by open_read.
READ_BLOCK_SIZE = 1 * MiB

PROBE_FOLDER = ".receiver-probe"

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


def part_size_for(part_number: int, size_hint: int | None, base: int = DEFAULT_PART_SIZE) -> int:
    """The size of part `part_number` (1-based) so an object never needs more than 10,000 parts.

    With a size hint (the artifact's Content-Length) every part has the same size: `base`, or
    size_hint / 10,000 rounded up to a MiB when that is larger (a 500 GB artifact gets 48 MiB parts,
    9,934 of them). Without one, assume the worst: the size doubles every 1,000 parts, so the first
    8 GiB go in 8 MiB parts and 5 TiB still fits (parts never exceed 4 GiB < S3's 5 GiB).
    """
    if size_hint is not None:
        spread = -(-size_hint // MAX_PARTS)
        return max(base, -(-spread // MiB) * MiB)
    return min(MAX_PART_SIZE, base << ((part_number - 1) // PARTS_PER_TIER))


def make_client(
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

    Its own Session: boto3's default session is not thread-safe to create clients from. With
    `checksum=False` the client also stops botocore's default CRC32 checksums (botocore >= 1.36 sends
    them "when_supported"), which some S3-compatible stores reject like the SHA-256 ones.

    Attempts per request: `max_attempts`, else the standard AWS_MAX_ATTEMPTS (or `max_attempts` in
    ~/.aws/config), else MAX_ATTEMPTS.
    """
    core = botocore.session.get_session()
    if max_attempts is None:
        max_attempts = core.get_config_variable("max_attempts") or MAX_ATTEMPTS
    options: dict[str, Any] = {
        "retries": {"mode": "standard", "max_attempts": max_attempts},
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "max_pool_connections": max_pool_connections,
        "tcp_keepalive": True,
    }
    if not checksum:
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    session = boto3.session.Session(botocore_session=core)
    return session.client("s3", endpoint_url=endpoint_url, region_name=region_name, config=Config(**options))


class S3Storage(Storage):
    """Objects under `prefix/` in `bucket`; keys are relative to the prefix.

    Thread-safe: one instance (one boto3 client, which is thread-safe) serves every job of a worker
    process; each writer has its own small thread pool for its parts.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        sse: str | None = None,
        kms_key_id: str | None = None,
        checksum: bool = True,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        client: Any = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 storage needs a bucket")
        if sse not in (None, "AES256", "aws:kms"):
            raise ValueError("sse must be None, 'AES256' or 'aws:kms'")
        if kms_key_id and sse != "aws:kms":
            raise ValueError("kms_key_id needs sse='aws:kms'")
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes (S3 limits)")
        if buffer_bytes < part_size:
            raise ValueError("buffer_bytes must hold at least one part")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.checksum = checksum
        self.buffer_bytes = buffer_bytes
        self.part_size = part_size
        self.max_concurrency = max(1, max_concurrency)
        self._own_client = client is None
        self.client = client if client is not None else make_client(checksum=checksum)
        #: False once the store answered 501 to If-None-Match (see put_if_absent).
        self._conditional_writes = True
        self._probe_client: Any = None

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r})"

    # --- keys -------------------------------------------------------------------------------------

    def full_key(self, key: str) -> str:
        """The S3 key of a storage key: `prefix/key`."""
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def part_size_for(self, part_number: int, size_hint: int | None) -> int:
        return part_size_for(part_number, size_hint, self.part_size)

    # --- writing ----------------------------------------------------------------------------------

    def open_writer(self, key: str, *, token: str, size_hint: int | None = None) -> S3Writer:
        if size_hint is not None and size_hint > MAX_OBJECT_SIZE:
            raise ObjectTooLarge(f"{key}: {size_hint} bytes exceeds S3's 5 TiB object limit")
        return S3Writer(self, key, self.full_key(key), token=token, size_hint=size_hint)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """PutObject with `If-None-Match: *` (S3 conditional writes): 412 PreconditionFailed means the
        key exists, so False. A 409 ConditionalRequestConflict (another conditional write to the same
        key in flight) is retried, as the S3 User Guide asks.

        A store that answers 501 NotImplemented to the header falls back, for the life of this
        object, to HeadObject then PutObject, which is NOT atomic: two writers racing through the gap
        both write and the last one wins. Stores that silently ignore the header cannot be detected.
        """
        full = self.full_key(key)
        if self._conditional_writes:
            for attempt in range(3):
                with self._errors("PutObject", key):
                    try:
                        self._put(full, data, IfNoneMatch="*")
                        return True
                    except ClientError as exc:
                        code, status = _code(exc), _status(exc)
                        if code == "PreconditionFailed" or status == 412:
                            return False
                        if code == "ConditionalRequestConflict" and attempt < 2:
                            time.sleep(0.2 * (attempt + 1))
                            continue
                        if code != "NotImplemented" and status != 501:
                            raise
                self._conditional_writes = False
                log.warning(
                    "%s does not support conditional writes (If-None-Match); publishing with "
                    "HeadObject + PutObject, which two racing writers can both pass",
                    self.url,
                )
                break
        if self.exists(key):
            return False
        with self._errors("PutObject", key):
            self._put(full, data)
        return True

    def _put(self, full_key: str, data: bytes, client: Any = None, **extra: Any) -> dict[str, Any]:
        params = {"Bucket": self.bucket, "Key": full_key, "Body": data, **self._object_args(full_key), **extra}
        if self.checksum:
            params["ChecksumAlgorithm"] = "SHA256"
        return (client or self.client).put_object(**params)

    def _object_args(self, full_key: str) -> dict[str, str]:
        """Arguments of PutObject and CreateMultipartUpload (not UploadPart): encryption and type."""
        args = {"ContentType": _content_type(full_key)}
        if self.sse:
            args["ServerSideEncryption"] = self.sse
        if self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
        return args

    # --- reading ----------------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        response = self._get(key)
        with self._errors("GetObject", key), contextlib.closing(response["Body"]) as body:
            return body.read()

    def exists(self, key: str) -> bool:
        full = self.full_key(key)
        try:
            with self._errors("HeadObject", key):
                self.client.head_object(Bucket=self.bucket, Key=full)
            return True
        except ObjectNotFound:
            return False
        except StoragePermissionError:
            if self._absent_by_listing(full):
                return False
            raise

    def open_read(self, key: str) -> Iterator[bytes]:
        """GetObject now (a missing key raises ObjectNotFound here), then yield 1 MiB blocks."""
        response = self._get(key)
        return self._blocks(response["Body"], key)

    def _get(self, key: str) -> dict[str, Any]:
        full = self.full_key(key)
        try:
            with self._errors("GetObject", key):
                return self.client.get_object(Bucket=self.bucket, Key=full)
        except StoragePermissionError:
            if self._absent_by_listing(full):
                raise ObjectNotFound(f"{key} does not exist in {self.url}") from None
            raise

    def _absent_by_listing(self, full_key: str) -> bool:
        """Whether a listing shows `full_key` absent. S3 answers 403, not 404, for a missing key to a
        caller without s3:ListBucket for it (HeadObject/GetObject docs), and the receiver's policy
        grants ListBucket only with an s3:prefix condition that a GET does not carry."""
        try:
            response = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full_key, MaxKeys=1)
        except (ClientError, BotoCoreError):
            return False
        return not any(item["Key"] == full_key for item in response.get("Contents", []))

    def _blocks(self, body: Any, key: str) -> Iterator[bytes]:
        with contextlib.closing(body), self._errors("GetObject", key):
            yield from body.iter_chunks(READ_BLOCK_SIZE)

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys under `prefix` (relative to the root), via paginated ListObjectsV2."""
        root = self._root()
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors("ListObjectsV2", prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                for item in page.get("Contents", []):
                    yield item["Key"][len(root) :]

    # --- housekeeping -----------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        with self._errors("DeleteObject", key):
            self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key))

    def check(self) -> None:
        """ListObjectsV2 on the prefix, then a probe PutObject + DeleteObject under
        `prefix/.receiver-probe/`.

        ListObjectsV2 with the prefix stands in for HeadBucket: HeadBucket is authorised as
        s3:ListBucket without an s3:prefix, which the least-privilege policy
        (infra/cloudformation/bucket.yaml) rightly does not grant. Both prove the bucket exists.

        Without retries (PROBE_TIMEOUT), when this storage made its own client.
        """
        client = self._probe()
        root = self._root()
        with self._errors("ListObjectsV2"):
            client.list_objects_v2(Bucket=self.bucket, Prefix=root, MaxKeys=1)
        probe = f"{root}{PROBE_FOLDER}/{uuid.uuid4().hex}"
        with self._errors("PutObject", probe):
            self._put(probe, b"ok\n", client)
        with self._errors("DeleteObject", probe):
            client.delete_object(Bucket=self.bucket, Key=probe)

    def _probe(self) -> Any:
        if not self._own_client:
            return self.client
        if self._probe_client is None:
            self._probe_client = make_client(
                checksum=self.checksum,
                max_attempts=1,
                connect_timeout=PROBE_TIMEOUT,
                read_timeout=PROBE_TIMEOUT,
                max_pool_connections=2,
            )
        return self._probe_client

    def cleanup_partials(self, older_than_seconds: float = 0, *, prefix: str = "") -> int:
        """Abort multipart uploads under the prefix initiated more than `older_than_seconds` ago.

        The backstop for writers that died without aborting (a kill -9, a lost machine); the bucket's
        AbortIncompleteMultipartUpload lifecycle rule is the backstop's backstop.
        """
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than_seconds)
        paginator = self.client.get_paginator("list_multipart_uploads")
        removed = 0
        with self._errors("ListMultipartUploads"):
            pages = list(paginator.paginate(Bucket=self.bucket, Prefix=self._root() + prefix))
        for page in pages:
            for upload in page.get("Uploads", []):
                if upload["Initiated"] > cutoff:
                    continue
                with self._errors("AbortMultipartUpload", upload["Key"]):
                    try:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    except ClientError as exc:
                        if _code(exc) != "NoSuchUpload":
                            raise
                        continue
                removed += 1
        return removed

    def close(self) -> None:
        if self._own_client:
            self.client.close()
            if self._probe_client is not None:
                self._probe_client.close()

    # --- errors -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, operation: str, key: str | None = None) -> Iterator[None]:
        """Turn botocore's exceptions into the StorageError family (see `translate`)."""
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise self.translate(exc, operation, key) from exc

    def translate(self, exc: Exception, operation: str, key: str | None = None) -> StorageError:
        """The named error for a botocore failure of `operation` (an S3 API name) on `key`.

        Permission errors name the bucket, the prefix and the IAM action refused, so an operator can
        fix the policy from the message alone.
        """
        action = _IAM_ACTIONS.get(operation, f"s3:{operation}")
        where = f"bucket {self.bucket} prefix {self.prefix or '(bucket root)'}"
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            message = str(exc.response.get("Error", {}).get("Message") or "")[:300]
            detail = f"{code}: {message}" if message else (code or f"HTTP {status}")
            if code in ("NoSuchKey", "404") or (status == 404 and not code):
                return ObjectNotFound(f"{key or 'the object'} does not exist in {self.url}")
            if code == "NoSuchBucket":
                return StoragePermissionError(
                    f"{action} failed: bucket {self.bucket} does not exist (prefix {self.prefix or '(bucket root)'}); "
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


class _MultipartUpload:
    """The id of a multipart upload and how to abort it: apart from the writer, so a weakref
    finalizer can abort an abandoned upload without keeping its writer alive."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self.client = client
        self.bucket = bucket
        self.key = key
        self.upload_id: str | None = None

    def abort(self) -> None:
        """AbortMultipartUpload; an upload already gone (NoSuchUpload) counts as aborted."""
        if self.upload_id is None:
            return
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        except ClientError as exc:
            if _code(exc) != "NoSuchUpload":
                raise
        self.upload_id = None

    def abort_quietly(self) -> bool:
        try:
            self.abort()
        except Exception as exc:  # noqa: BLE001 - we are already failing or being collected
            log.warning(
                "could not abort multipart upload %s of s3://%s/%s (%s); cleanup_partials or the bucket's "
                "AbortIncompleteMultipartUpload rule will remove it",
                self.upload_id,
                self.bucket,
                self.key,
                exc,
            )
            return False
        return True


def _abort_abandoned(upload: _MultipartUpload) -> None:
    if upload.upload_id is not None:
        log.warning("writer of s3://%s/%s dropped without commit or abort; aborting its upload", upload.bucket, upload.key)
        upload.abort_quietly()


class S3Writer(Writer):
    """One object streaming into S3: a single PutObject if it stays under one part, else a multipart
    upload whose parts go up on a small thread pool while `write()` fills the next one.

    Memory: the part being filled plus the parts in flight never exceed `buffer_bytes`; a part is
    filled in place, never held twice. When two parts do not fit the budget (parts larger than half
    of it: at the default 24 MiB, artifacts over about 120 GiB, whose parts grow past 12 MiB to stay
    within 10,000) the part is uploaded by the calling thread and held alone.

    Used by one thread at a time; `abort()` may come from another thread (a shutdown) and wakes a
    `write()` blocked on the budget, which then raises.
    """

    def __init__(self, storage: S3Storage, key: str, full_key: str, *, token: str, size_hint: int | None) -> None:
        self.key = key
        self.token = token
        self.bytes_written = 0
        self.size_hint = size_hint
        self._storage = storage
        self._full_key = full_key
        self._part_size = storage.part_size_for(1, size_hint)
        #: The part being filled, allocated whole: each block is copied in and released at once, so a
        #: part is never held twice (as blocks and as their join) while it is sent.
        self._part: bytearray | None = None
        self._buffered = 0
        self._next_part = 1
        self._parts: dict[int, dict[str, Any]] = {}
        self._futures: set[Future[None]] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._cond = threading.Condition()
        self._in_flight = 0
        self._error: StorageError | None = None
        self._abort_lock = threading.Lock()
        self._state = "open"
        self._upload = _MultipartUpload(storage.client, storage.bucket, full_key)
        self._finalizer = weakref.finalize(self, _abort_abandoned, self._upload)

    def __repr__(self) -> str:
        return f"<S3Writer {self._storage.url}/{self.key} {self._state}, {self.bytes_written} bytes>"

    @property
    def upload_id(self) -> str | None:
        """The multipart upload in progress, if one was started."""
        return self._upload.upload_id

    @property
    def part_size(self) -> int:
        """The size of the part being filled."""
        return self._part_size

    # --- the Writer interface ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Buffer `data`; each full part goes to the pool. Blocks while the budget is full."""
        if self._state != "open":
            raise ValueError(f"write to an {self._state} writer ({self.key})")
        try:
            self._raise_if_failed()
            view = memoryview(data)
            while view:
                take = min(len(view), self._part_size - self._buffered)
                if self._part is None:
                    left = None if self.size_hint is None else self.size_hint - self.bytes_written - (len(data) - len(view))
                    self._part = bytearray(self._part_size if left is None or left <= 0 else min(self._part_size, left))
                self._part[self._buffered : self._buffered + take] = view[:take]
                self._buffered += take
                view = view[take:]
                if self._buffered >= self._part_size:
                    self._send_part()
        except BaseException:
            self._abort_upload()
            raise
        self.bytes_written += len(data)

    def commit(self) -> None:
        """PutObject (under one part) or the last part + CompleteMultipartUpload. On any failure the
        upload is aborted and a StorageError raised; the object then does not exist."""
        if self._state == "committed":
            return
        if self._state != "open":
            raise ValueError(f"commit of an {self._state} writer ({self.key})")
        try:
            self._raise_if_failed()
            if self._upload.upload_id is None and self._next_part == 1:
                body = self._take_part()
                with self._storage._errors("PutObject", self.key):
                    self._storage._put(self._full_key, body)
            else:
                if self._buffered:
                    self._send_part()
                wait(list(self._futures))
                self._raise_if_failed()
                self._complete()
        except BaseException:
            self._abort_upload()
            raise
        self._state = "committed"
        self._finalizer.detach()
        self._shutdown_pool()

    def abort(self) -> None:
        """Stop queued parts, wait for those on the wire, AbortMultipartUpload. Never raises: if S3
        cannot be reached the upload stays (cleanup_partials or the lifecycle rule remove it later)
        and a later abort() tries again. A no-op after commit."""
        if self._state == "committed":
            return
        self._state = "aborted"
        self._abort_upload()

    # --- parts ------------------------------------------------------------------------------------

    def _send_part(self) -> None:
        body = self._take_part()
        number = self._next_part
        if number > MAX_PARTS:
            raise ObjectTooLarge(
                f"{self.key}: more than {MAX_PARTS} parts of {len(body)} bytes (S3's limit); "
                f"the stream ran past its size hint of {self.size_hint} bytes"
            )
        self._next_part += 1
        self._part_size = self._storage.part_size_for(self._next_part, self.size_hint)
        if self._upload.upload_id is None:
            self._create_upload()
        budget = self._storage.buffer_bytes
        with self._cond:
            while self._error is None and self._in_flight and self._in_flight + len(body) + self._part_size > budget:
                self._cond.wait(1.0)
            inline = self._in_flight + len(body) + self._part_size > budget
            if self._error is None and not inline:
                self._in_flight += len(body)
        self._raise_if_failed()
        if inline:
            self._upload_part(number, body)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._storage.max_concurrency, thread_name_prefix="s3-part")
        future = self._executor.submit(self._run_part, number, body)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    def _take_part(self) -> bytes | bytearray:
        """The filled part, handed over whole (botocore takes a bytearray as a body)."""
        part, filled = self._part, self._buffered
        self._part, self._buffered = None, 0
        if part is None:
            return b""
        if filled < len(part):
            del part[filled:]  # the last part, or a stream that ended before its size hint
        return part

    def _create_upload(self) -> None:
        params: dict[str, Any] = {"Bucket": self._storage.bucket, "Key": self._full_key}
        params.update(self._storage._object_args(self._full_key))
        if self._storage.checksum:
            params["ChecksumAlgorithm"] = "SHA256"
        with self._storage._errors("CreateMultipartUpload", self.key):
            self._upload.upload_id = self._storage.client.create_multipart_upload(**params)["UploadId"]

    def _run_part(self, number: int, body: bytes | bytearray) -> None:
        """A pool thread's task: upload, record the first failure, give the budget back."""
        try:
            self._upload_part(number, body)
        except StorageError as exc:
            self._record_error(exc)
        except BaseException as exc:  # noqa: BLE001 - surfaced to the writer's thread, not lost
            self._record_error(StorageError(f"part {number} of {self.key} failed: {exc!r}"))
        finally:
            with self._cond:
                self._in_flight -= len(body)
                self._cond.notify_all()

    def _upload_part(self, number: int, body: bytes | bytearray) -> None:
        storage = self._storage
        params: dict[str, Any] = {
            "Bucket": storage.bucket,
            "Key": self._full_key,
            "UploadId": self._upload.upload_id,
            "PartNumber": number,
            "Body": body,
        }
        if storage.checksum:
            params["ChecksumAlgorithm"] = "SHA256"
        with storage._errors("UploadPart", self.key):
            response = storage.client.upload_part(**params)
        part = {"PartNumber": number, "ETag": response["ETag"]}
        if storage.checksum and response.get("ChecksumSHA256"):
            part["ChecksumSHA256"] = response["ChecksumSHA256"]
        with self._cond:
            self._parts[number] = part

    def _complete(self) -> None:
        parts = [self._parts[number] for number in range(1, self._next_part)]
        with self._storage._errors("CompleteMultipartUpload", self.key):
            self._storage.client.complete_multipart_upload(
                Bucket=self._storage.bucket,
                Key=self._full_key,
                UploadId=self._upload.upload_id,
                MultipartUpload={"Parts": parts},
            )
        self._upload.upload_id = None

    # --- failure ----------------------------------------------------------------------------------

    def _record_error(self, exc: StorageError) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _abort_upload(self) -> None:
        with self._abort_lock:
            self._record_error(StorageUnavailable(f"upload of {self._storage.url}/{self.key} was aborted"))
            self._part = None
            self._buffered = 0
            futures = list(self._futures)
            for future in futures:
                future.cancel()
            _done, running = wait(futures, timeout=ABORT_WAIT_SECONDS)
            if running:
                log.warning("%d part uploads of %s still running after %.0f s", len(running), self.key, ABORT_WAIT_SECONDS)
            self._shutdown_pool()
            if self._upload.upload_id is not None and self._upload.abort_quietly():
                self._finalizer.detach()

    def _shutdown_pool(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _content_type(key: str) -> str:
    if key.endswith(".gz"):
        return "application/gzip"
    if key.endswith(".jsonl"):
        return "application/x-ndjson"
    if key.endswith(".json"):
        return "application/json"
    return "application/octet-stream"


def _check_key(key: str) -> None:
    """Keys are relative POSIX paths, like the local backend's: no way above the prefix."""
    if not isinstance(key, str) or not key:
        raise ValueError("a storage key is a non-empty relative path")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"storage key {key!r} must be a relative POSIX path inside the storage root")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"storage key {key!r} has an empty, '.' or '..' segment")

"""A storage root in an S3 bucket (`s3://bucket/prefix`), or any S3-compatible store.

Writes stream into multipart uploads (writer.py) within S3's limits (limits.py); botocore's
failures become the StorageError family (errors.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from ...errors import (
    ObjectNotFound,
    ObjectTooLarge,
    StorageEncryptionUnsupported,
    StorageError,
    StoragePermissionError,
    StorageUnavailable,
)
from ..base import Storage
from . import lifecycle
from .client import PROBE_TIMEOUT, make_client
from .errors import error_code, error_status, translate, translating
from .limits import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_CONCURRENCY,
    DEFAULT_PART_SIZE,
    MAX_OBJECT_SIZE,
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    MiB,
)
from .writer import S3Writer, put_object

__all__ = ["S3Storage"]

log = logging.getLogger(__name__)

#: Blocks yielded by open_read.
READ_BLOCK_SIZE = 1 * MiB

PROBE_FOLDER = ".receiver-probe"
#: The operations that carry (or complete) an encrypted write.
_WRITES = frozenset({"PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"})


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

    # --- writing ----------------------------------------------------------------------------------

    def open_writer(self, key: str, *, token: str, size_hint: int | None = None) -> S3Writer:
        if size_hint is not None and size_hint > MAX_OBJECT_SIZE:
            raise ObjectTooLarge(f"{key}: {size_hint} bytes exceeds S3's 5 TiB object limit")
        full = self.full_key(key)
        return S3Writer(
            self.client,
            self.bucket,
            key,
            full,
            token=token,
            size_hint=size_hint,
            translate=self.translate,
            url=self.url,
            object_args=self._object_args(full),
            checksum=self.checksum,
            part_size=self.part_size,
            buffer_bytes=self.buffer_bytes,
            max_concurrency=self.max_concurrency,
        )

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
                        code, status = error_code(exc), error_status(exc)
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
        return put_object(
            client or self.client,
            self.bucket,
            full_key,
            data,
            object_args=self._object_args(full_key),
            checksum=self.checksum,
            **extra,
        )

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
                        if error_code(exc) != "NoSuchUpload":
                            raise
                        continue
                removed += 1
        return removed

    def close(self) -> None:
        if self._own_client:
            self.client.close()
            if self._probe_client is not None:
                self._probe_client.close()

    # --- errors and lifecycle --------------------------------------------------------------------

    def translate(self, exc: Exception, operation: str, key: str | None = None) -> StorageError:
        """The named error for a botocore failure of `operation` (an S3 API name) on `key`.

        Permission errors name the bucket, the prefix and the IAM action refused, so an operator can
        fix the policy from the message alone. A 500 on a write under `aws:kms` is checked against
        the same write without encryption (`_encryption_refused`): a store that has no KMS answers
        500 to every encrypted write, which is a setting to change, not an outage to wait out.
        """
        error = translate(exc, operation, key, bucket=self.bucket, prefix=self.prefix, url=self.url)
        if (
            self.sse == "aws:kms"
            and operation in _WRITES
            and isinstance(error, StorageUnavailable)
            and isinstance(exc, ClientError)
            and error_status(exc) == 500
            and self._encryption_refused()
        ):
            return StorageEncryptionUnsupported(
                f"{self.url} fails every write with server-side encryption aws:kms (HTTP 500 {error_code(exc)}) "
                "and accepts the same write without it: the store has no KMS configured. Set RECEIVER_S3_SSE to "
                "AES256 or leave it unset (the bucket's default encryption applies), or configure KMS on the store"
            )
        return error

    def _encryption_refused(self) -> bool:
        """Whether a small probe PutObject answers 500 with our encryption and succeeds without it
        (one try each, under `prefix/.receiver-probe/`, deleted after). Anything else, an outage
        included, is False: the caller's error stands."""
        client = self._probe()
        probe = f"{self._root()}{PROBE_FOLDER}/sse-{uuid.uuid4().hex}"
        statuses: list[int] = []
        for object_args in (self._object_args(probe), {"ContentType": "text/plain"}):
            try:
                put_object(client, self.bucket, probe, b"ok\n", object_args=object_args, checksum=self.checksum)
                statuses.append(200)
            except ClientError as exc:
                statuses.append(error_status(exc) or 0)
            except BotoCoreError:
                return False
        with contextlib.suppress(ClientError, BotoCoreError):
            client.delete_object(Bucket=self.bucket, Key=probe)
        return statuses == [500, 200]

    def _errors(self, operation: str, key: str | None = None) -> contextlib.AbstractContextManager[None]:
        """Turn botocore's exceptions inside the block into the StorageError family."""
        return translating(self.translate, operation, key)

    def check_abort_rule(self) -> tuple[bool, str]:
        """Whether a lifecycle rule of the bucket aborts incomplete multipart uploads under our
        prefix, and the detail (the rule, or the fix). See lifecycle.check_abort_rule."""
        return lifecycle.check_abort_rule(self.client, self.bucket, self.prefix)


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

"""A writer that streams one object into S3: a single PutObject if it stays under one part, else a
multipart upload fed straight from the download, with no temporary file and no more memory than a
budget, whatever the artifact's size.

An object exists only once CompleteMultipartUpload returns, so a reader never sees a partial results
file; every failure aborts the upload so no parts linger (and are billed) after it.

boto3's managed transfer (`upload_fileobj`) is not used: on a non-seekable stream it buffers about
15 parts whatever the budget (BENCHMARKS.md, "Streaming to S3"), and it cannot start before it
knows the object is small enough for a single PutObject. The writer does the part bookkeeping
itself in a few lines, the way s3transfer's `UploadSubmissionTask` does.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from botocore.exceptions import ClientError

from ...errors import ObjectTooLarge, StorageError, StorageUnavailable
from ..base import Writer
from .errors import Translate, error_code, translating
from .limits import DEFAULT_BUFFER_BYTES, DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE, MAX_PARTS, part_size_for

__all__ = ["S3Writer", "put_object"]

log = logging.getLogger(__name__)

#: How long abort() waits for part uploads already on the wire before AbortMultipartUpload.
ABORT_WAIT_SECONDS = 30.0


def put_object(
    client: Any,
    bucket: str,
    full_key: str,
    data: bytes | bytearray,
    *,
    object_args: Mapping[str, str],
    checksum: bool,
    **extra: Any,
) -> dict[str, Any]:
    """PutObject of `data` at `full_key`, with the object's encryption and type (`object_args`) and
    a SHA-256 checksum S3 verifies on arrival when `checksum` is on."""
    params: dict[str, Any] = {"Bucket": bucket, "Key": full_key, "Body": data, **object_args, **extra}
    if checksum:
        params["ChecksumAlgorithm"] = "SHA256"
    return client.put_object(**params)


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
            if error_code(exc) != "NoSuchUpload":
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

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        full_key: str,
        *,
        token: str,
        size_hint: int | None,
        translate: Translate,
        url: str,
        object_args: Mapping[str, str],
        checksum: bool = True,
        part_size: int = DEFAULT_PART_SIZE,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        max_concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        """Write `key` (a storage key; `full_key` in `bucket`) through `client`.

        `translate` names botocore's failures; `url` is the storage root, for messages.
        `object_args` (type, encryption) go with PutObject and CreateMultipartUpload. Parts start at
        `part_size` (grown to fit 10,000 parts, see `part_size_for`); the parts filling and in
        flight stay within `buffer_bytes`, at most `max_concurrency` of them uploading at once.
        """
        self.key = key
        self.token = token
        self.bytes_written = 0
        self.size_hint = size_hint
        self._client = client
        self._bucket = bucket
        self._full_key = full_key
        self._translate = translate
        self._url = url
        self._object_args = dict(object_args)
        self._checksum = checksum
        self._base_part_size = part_size
        self._buffer_bytes = buffer_bytes
        self._max_concurrency = max(1, max_concurrency)
        self._part_size = part_size_for(1, size_hint, part_size)
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
        self._upload = _MultipartUpload(client, bucket, full_key)
        self._finalizer = weakref.finalize(self, _abort_abandoned, self._upload)

    def __repr__(self) -> str:
        return f"<S3Writer {self._url}/{self.key} {self._state}, {self.bytes_written} bytes>"

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
                with translating(self._translate, "PutObject", self.key):
                    put_object(
                        self._client,
                        self._bucket,
                        self._full_key,
                        body,
                        object_args=self._object_args,
                        checksum=self._checksum,
                    )
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
        self._part_size = part_size_for(self._next_part, self.size_hint, self._base_part_size)
        if self._upload.upload_id is None:
            self._create_upload()
        budget = self._buffer_bytes
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
            self._executor = ThreadPoolExecutor(self._max_concurrency, thread_name_prefix="s3-part")
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
        params: dict[str, Any] = {"Bucket": self._bucket, "Key": self._full_key, **self._object_args}
        if self._checksum:
            params["ChecksumAlgorithm"] = "SHA256"
        with translating(self._translate, "CreateMultipartUpload", self.key):
            self._upload.upload_id = self._client.create_multipart_upload(**params)["UploadId"]

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
        params: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": self._full_key,
            "UploadId": self._upload.upload_id,
            "PartNumber": number,
            "Body": body,
        }
        if self._checksum:
            params["ChecksumAlgorithm"] = "SHA256"
        with translating(self._translate, "UploadPart", self.key):
            response = self._client.upload_part(**params)
        part = {"PartNumber": number, "ETag": response["ETag"]}
        if self._checksum and response.get("ChecksumSHA256"):
            part["ChecksumSHA256"] = response["ChecksumSHA256"]
        with self._cond:
            self._parts[number] = part

    def _complete(self) -> None:
        parts = [self._parts[number] for number in range(1, self._next_part)]
        with translating(self._translate, "CompleteMultipartUpload", self.key):
            self._client.complete_multipart_upload(
                Bucket=self._bucket,
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
            self._record_error(StorageUnavailable(f"upload of {self._url}/{self.key} was aborted"))
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

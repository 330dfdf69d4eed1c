"""Every failure the receiver can name, in one place.

The worker decides retry-or-dead from the class (``transient``), never from a message, so a new
failure mode is added here with the family it belongs to. Messages never carry a secret or an API key.
"""

from __future__ import annotations

from typing import Any


class ReceiverError(Exception):
    """Base class of every error the receiver raises on purpose."""

    #: Whether trying the same operation again later may succeed.
    transient: bool = False


# --- configuration --------------------------------------------------------------------------------


class ConfigError(ReceiverError):
    """A setting is missing or invalid; the process stops with exit code 2."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


# --- ingest ---------------------------------------------------------------------------------------


class SignatureError(ReceiverError):
    """The delivery's `X-BatchRouter-Signature` is missing or matches no accepted secret."""


class PayloadError(ReceiverError):
    """A signed delivery whose body is not JSON or fails validation."""

    def __init__(self, message: str, errors: dict[str, Any] | None = None) -> None:
        self.errors = errors or {}
        super().__init__(message)


class UnsafeBatchId(PayloadError):
    """A batch id that could escape the storage root or is not a single path segment."""


# --- ledger ---------------------------------------------------------------------------------------


class LedgerError(ReceiverError):
    """Base of ledger failures."""


class LedgerUnavailable(LedgerError):
    """The ledger cannot be reached or written; ingest answers 503 so BatchRouter retries."""

    transient = True


class LedgerConnectionLost(LedgerUnavailable):
    """The connection to the ledger broke or was refused (a PostgreSQL restart or failover): the
    pool reconnects on the next checkout, so a worker retries the call while its lease lasts."""


class SchemaOutdated(LedgerError):
    """The ledger's schema is older than this release and RECEIVER_AUTO_MIGRATE is false."""


class SecretUnreadable(LedgerError):
    """A stored webhook secret that RECEIVER_ENCRYPTION_KEY cannot decrypt (or no key to do it)."""


class UnsupportedDatabase(ConfigError):
    """A DATABASE_URL whose backend this version does not support."""


# --- BatchRouter API ------------------------------------------------------------------------------


class APIError(ReceiverError):
    """BatchRouter answered with an error envelope ``{"error": {code, message, details}}``."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: Any = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.details = details
        self.retry_after = retry_after
        super().__init__(message)


class APITransientError(APIError):
    """A 5xx, a timeout or a dropped connection talking to the API: retry with backoff."""

    transient = True


class RateLimited(APITransientError):
    """429: retry after `retry_after` seconds when BatchRouter said so."""


class BadRequest(APIError):
    """400: BatchRouter rejected the request; `details` says why."""


class AuthenticationFailed(APIError):
    """401: the API key is missing, revoked or for another environment."""


class InsufficientCredits(APIError):
    """402: the org has no credit left."""


class PermissionDenied(APIError):
    """403: the key may not see this resource (another org's batch, a missing scope)."""


class BatchNotFound(APIError):
    """404: BatchRouter does not know this batch (or it is not ours)."""


class Conflict(APIError):
    """409: an action on a terminal batch, or results that are not ready yet."""

    transient = True


class UnexpectedResponse(APIError):
    """A 2xx whose body we cannot use (not JSON, no batch status, no artifact URL)."""

    transient = True


class ArtifactUnavailable(APIError):
    """artifact-url offers no download for a batch we can see (404, 405, 410 or 501): its results
    are to be paged through `GET /v1/batches/{id}/results` instead."""


# --- artifact transfer ----------------------------------------------------------------------------


class TransferError(ReceiverError):
    """Base of artifact download failures."""

    transient = True


class UnsafeURL(TransferError):
    """An artifact URL (or a redirect) refused by policy before any connection: never retried."""

    transient = False


class ArtifactExpired(TransferError):
    """The artifact host answered 401/403/410: the signed URL expired; ask artifact-url again."""


class IncompleteDownload(TransferError):
    """Fewer bytes arrived than Content-Length or Content-Range promised (or, for results with no
    length at all, fewer lines than the batch counts)."""


class DownloadFailed(TransferError):
    """The artifact host failed: a 5xx, a 429, a timeout or a dropped connection.

    `status` is the HTTP status the host answered, None when no answer came (a timeout, a dropped
    connection) or the answer was not the failure (a bad redirect, a changed artifact); the retry
    cause is read from it, never from the message.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ArtifactMissing(TransferError):
    """The artifact host answered 404 for a URL the API just gave us."""


class CorruptArtifact(TransferError):
    """A gzip artifact whose bytes do not decompress (or end mid-stream): asking again will not help."""

    transient = False


# --- storage --------------------------------------------------------------------------------------


class StorageError(ReceiverError):
    """Base of storage failures."""


class StorageUnavailable(StorageError):
    """The storage is down or full for now (an S3 5xx or timeout, ENOSPC): retry later."""

    transient = True


class StoragePermissionError(StorageError):
    """The storage refuses us (AccessDenied, NoSuchBucket, EACCES): an operator must fix it."""


class StorageEncryptionUnsupported(StoragePermissionError):
    """The store fails every write encrypted the configured way (RECEIVER_S3_SSE=aws:kms) and
    accepts the same write unencrypted: an S3-compatible store without KMS answers 500 to each, which
    retries would only repeat until the job is dead. An operator must change the setting."""


class ObjectNotFound(StorageError):
    """The key does not exist in storage."""


class NotStored(StorageError, LookupError):
    """The results reader was asked for a batch with no manifest, or one stored without results."""


class ChecksumMismatch(StorageError):
    """Stored bytes read back differ from the sha256 (or size) their manifest recorded."""


class AlreadyPublished(StorageError):
    """A manifest for this batch exists already: another worker or replica stored it first."""


class ObjectTooLarge(StorageError):
    """An object beyond what the store accepts (S3: 5 TiB, or more than 10,000 parts): never retried."""


# --- notifications --------------------------------------------------------------------------------


class NotifyError(ReceiverError):
    """One attempt to hand a `batch.stored` event to a target (webhook, SQS, EventBridge) failed.

    `retry_after` is the target's own hint (a Retry-After header), in seconds, when it gave one.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotifyTransient(NotifyError):
    """The target may accept the event later: a 5xx or non-2xx answer, throttling, a refused or
    dropped connection, a timeout; also a missing queue or a denied permission, which an operator
    fixes without losing the event (it stays pending and is retried)."""

    transient = True


class NotifyRejected(NotifyError):
    """The target will never accept this event as it is (too large, malformed for the target): the
    delivery is marked failed at once; `receiver notify --replay` sends it again after a fix."""


# --- worker ---------------------------------------------------------------------------------------


class BatchNotTerminal(ReceiverError):
    """BatchRouter says the batch is still running, whatever the delivery claimed."""

    transient = True


class JobCancelled(ReceiverError):
    """The worker is shutting down (SIGTERM): the job is given back, not failed."""


class LeaseLost(JobCancelled):
    """Another worker took the job over because our lease ran out; stop without publishing."""

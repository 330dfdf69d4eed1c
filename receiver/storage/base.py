"""What the worker sees of storage: open a writer for a key, feed it bytes, commit or abort.

The worker never knows whether it is a folder or a bucket (s3transfer's split of *what* from *how*).
A writer's bytes are invisible at the final key until `commit()` returns; `abort()` removes every
trace (the temporary file, or the multipart upload and its parts).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator


class Writer(abc.ABC):
    """One object being written. Append-only: a resumed download keeps feeding the same writer."""

    key: str
    bytes_written: int

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Append `data`. May block while earlier parts upload (bounded memory)."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Make the object visible at `key`, whole. Raises StorageError subclasses."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop everything written; safe to call twice and after a failed commit."""

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class Storage(abc.ABC):
    """A storage root (a folder or `s3://bucket/prefix`); every key is relative to it."""

    url: str

    @abc.abstractmethod
    def open_writer(self, key: str, *, token: str, size_hint: int | None = None) -> Writer:
        """Start writing `key`. `token` names the temporary object (unique per job attempt);
        `size_hint` (the Content-Length, when known) lets S3 pick a part size within 10,000 parts."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write small `data` at `key` atomically unless `key` exists. False if it existed.

        This is how a manifest is published: two workers can never both publish a batch."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read a small object whole (a manifest). Raises ObjectNotFound."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def open_read(self, key: str) -> Iterator[bytes]:
        """Stream an object in blocks (for `receiver cat`). Raises ObjectNotFound."""

    @abc.abstractmethod
    def list_keys(self, prefix: str) -> Iterator[str]:
        """Keys under `prefix` (relative to the root), in no particular order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key` if it exists."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise StorageError unless the storage is reachable and writable (for /readyz)."""

    @abc.abstractmethod
    def cleanup_partials(self, older_than_seconds: float = 0, *, prefix: str = "") -> int:
        """Delete temporary objects (and abort multipart uploads) left by crashed writers under our
        root (or, with `prefix`, a folder of the layout, those of files being written into it),
        older than the given age. Returns how many were removed.

        Its cost follows the writes in flight, never the stored batches: the local backend lists
        its `.partial/` folder, S3 lists the bucket's unfinished multipart uploads."""

    def check_abort_rule(self) -> tuple[bool, str] | None:
        """Whether something removes the pieces a killed writer leaves behind, for `receiver
        register` to report: (found, detail), or None where there is nothing to check (a folder's
        temporary files are removed by cleanup_partials alone)."""
        return None

    def close(self) -> None:
        """Release connections and thread pools."""

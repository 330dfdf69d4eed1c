"""The results reader for Python jobs: `ResultStore` over the storage layout, local or S3.

    from receiver.results import ResultStore

    for row in ResultStore().rows("batch_123"):
        ...

Import-light on purpose: a downstream job installs the package for this module alone, so it loads
the storage backends and the manifest type, never Flask, gunicorn or the ledger. Reading streams in
blocks (1 MiB from storage), so memory stays flat however large a result is.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from .errors import ChecksumMismatch, NotStored
from .manifest import Manifest, StoredFile, read_manifest, stored_batch_ids
from .storage import Storage, storage_from_url

__all__ = ["ResultStore"]


class ResultStore:
    """A storage root as downstream jobs see it: manifests, and each batch's results."""

    def __init__(self, url: str | None = None) -> None:
        """`url`: a local path, `file://` or `s3://bucket/prefix`; RECEIVER_STORAGE_URL when None."""
        if url is None:
            from .config import Settings

            url = Settings.from_env().storage_url
        self.url = url
        self.storage: Storage = storage_from_url(url)

    def manifests(self) -> Iterator[dict[str, Any]]:
        """Every manifest, oldest `stored_at` first (ties by batch id). Reads them all before the
        first is yielded: the order needs every date."""
        found = []
        for batch_id in stored_batch_ids(self.storage):
            manifest = read_manifest(self.storage, batch_id)
            if manifest is not None:  # None: deleted since the listing
                found.append(manifest)
        found.sort(key=lambda m: (m.stored_at, m.batch_id))
        for manifest in found:
            yield manifest.to_dict()

    def manifest(self, batch_id: str) -> dict[str, Any]:
        """The batch's manifest; LookupError (NotStored) when it has none."""
        return self._stored(batch_id).to_dict()

    def _stored(self, batch_id: str) -> Manifest:
        manifest = read_manifest(self.storage, batch_id)
        if manifest is None:
            raise NotStored(f"batch {batch_id} is not stored in {self.url}")
        return manifest

    def open(self, batch_id: str) -> BinaryIO:
        """The stored results bytes (gzip stays gzip) as a binary file object; close it when done."""
        return io.BufferedReader(_BlockStream(self.storage.open_read(self._results(batch_id).key)), 1024 * 1024)

    def rows(self, batch_id: str, *, verify: bool = False) -> Iterator[Any]:
        """The batch's results, one parsed JSON object per line, in order (a `.jsonl.gz` artifact is
        decompressed). With `verify`, the stored bytes are hashed as they stream and checked against
        the manifest at the end: ChecksumMismatch after the last row if they differ."""
        results = self._results(batch_id)
        raw = _BlockStream(self.storage.open_read(results.key), hashlib.sha256() if verify else None)
        with io.BufferedReader(raw, 1024 * 1024) as buffered:
            text: BinaryIO = buffered
            if results.key.endswith(".gz"):
                text = gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[assignment]
            for line in text:
                if line.strip():
                    yield json.loads(line)
            if verify:
                while buffered.read(1024 * 1024):  # whatever the decompressor left unread
                    pass
                assert raw.hash is not None
                if raw.count != results.bytes or raw.hash.hexdigest() != results.sha256:
                    raise ChecksumMismatch(
                        f"{results.key}: read {raw.count} bytes with sha256 {raw.hash.hexdigest()}, "
                        f"the manifest says {results.bytes} bytes with sha256 {results.sha256}"
                    )

    def _results(self, batch_id: str) -> StoredFile:
        manifest = self._stored(batch_id)
        if manifest.results is None:
            raise NotStored(f"batch {batch_id} ended {manifest.status!r} without results")
        return manifest.results


class _BlockStream(io.RawIOBase):
    """A raw binary stream over an iterator of blocks (storage's `open_read`), optionally hashing
    what passes through."""

    def __init__(self, blocks: Iterator[bytes], hash: Any = None) -> None:
        self._blocks = blocks
        self._pending = memoryview(b"")
        self.hash = hash
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            block = next(self._blocks, None)
            if block is None:
                return 0
            if self.hash is not None:
                self.hash.update(block)
            self.count += len(block)
            self._pending = memoryview(block)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()
        super().close()

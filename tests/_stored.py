"""Stored batches written straight into a storage root, laid out as the worker lays them out, for
tests of what reads storage (`receiver wait`, the results reader) without running a download."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
from collections.abc import Iterator

from receiver import layout
from receiver.manifest import Manifest, StoredFile
from receiver.storage import Storage


def rows(count: int, pad: int = 0) -> Iterator[bytes]:
    for i in range(count):
        yield json.dumps({"custom_id": f"item-{i}", "n": i, "pad": "x" * pad}).encode() + b"\n"


def store_batch(
    storage: Storage,
    batch_id: str,
    lines: int = 10,
    *,
    compress: bool = False,
    status: str = "completed",
    pad: int = 0,
    stored_at: dt.datetime | None = None,
) -> Manifest:
    """Write `lines` JSON rows (gzipped with `compress`) and publish the manifest; `status` other
    than completed writes a manifest without results, as for a failed batch."""
    stored_at = stored_at or dt.datetime.now(dt.UTC)
    files: tuple[StoredFile, ...] = ()
    if status == "completed":
        key = layout.results_key(batch_id, layout.partition_date(stored_at), ".jsonl.gz" if compress else ".jsonl")
        digest, size = hashlib.sha256(), 0
        with storage.open_writer(key, token="test", size_hint=None) as writer:
            if compress:
                data = gzip.compress(b"".join(rows(lines, pad)))
                blocks: Iterator[bytes] = iter([data])
            else:
                blocks = rows(lines, pad)
            chunk = bytearray()
            for block in blocks:
                chunk += block
                if len(chunk) >= 1 << 20:
                    writer.write(bytes(chunk))
                    digest.update(chunk)
                    size += len(chunk)
                    chunk.clear()
            writer.write(bytes(chunk))
            digest.update(chunk)
            size += len(chunk)
            writer.commit()
        files = (StoredFile(key, size, digest.hexdigest(), lines),)
    manifest = Manifest(batch_id, status, files, stored_at, (), "artifact" if files else None, lines, {"id": batch_id})
    assert storage.put_if_absent(layout.manifest_key(batch_id), manifest.to_bytes())
    return manifest

"""The manifest: the commit marker written last, after every file it lists is whole at its key.

Downstream jobs wait for it and read it (docs/architecture.md, "The public interface"), so its
fields are part of the public interface. One type builds it (the worker), reads it back (adopting a
batch another worker published, `cat`, `ls`, the results reader) and turns it into bytes, so the
fields are named and mapped in one place, and :func:`read_manifest` is the one way to read a
batch's manifest from storage (the worker, `cat`, `wait`, `notify --replay`, the status page and
the results reader all use it).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from . import __version__, layout
from .errors import ObjectNotFound
from .layout import RESULTS

if TYPE_CHECKING:
    from .storage import Storage


@dataclasses.dataclass(frozen=True)
class StoredFile:
    """One file of a stored batch: its key relative to the storage root, and what was written."""

    key: str
    bytes: int
    sha256: str
    #: Lines of the text (of the decompressed text for a `.jsonl.gz` artifact).
    lines: int

    @property
    def is_results(self) -> bool:
        return self.key.startswith(RESULTS + "/")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "bytes": self.bytes, "sha256": self.sha256, "lines": self.lines}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoredFile:
        return cls(
            key=str(data["key"]),
            bytes=int(data.get("bytes", 0)),
            sha256=str(data.get("sha256", "")),
            lines=int(data.get("lines", 0)),
        )


@dataclasses.dataclass(frozen=True)
class Manifest:
    batch_id: str
    #: The batch's terminal status as BatchRouter spelled it.
    status: str
    files: tuple[StoredFile, ...]
    stored_at: dt.datetime
    event_ids: tuple[str, ...]
    #: ``artifact`` (the signed download), ``results_pages`` (paged through /results when there was
    #: no download) or None (a batch that ended without results).
    source: str | None
    #: From the batch's counts, when BatchRouter gave them.
    expected_items: int | None
    #: The batch object as BatchRouter returned it.
    batch: dict[str, Any]
    receiver_version: str = __version__
    #: Set only when read back: what the writer recorded, kept as written even if it disagrees with
    #: what this version would compute.
    recorded_counts_match: bool | None = dataclasses.field(default=None, compare=False)

    @property
    def results(self) -> StoredFile | None:
        """The results file, or None for a batch that ended without results."""
        return next((f for f in self.files if f.is_results), None)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def counts_match(self) -> bool | None:
        """Whether the results file has one line per item BatchRouter counted; None when there is
        no count or no results file to compare."""
        if self.recorded_counts_match is not None:
            return self.recorded_counts_match
        results = self.results
        if self.expected_items is None or results is None:
            return None
        return results.lines == self.expected_items

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "status": self.status,
            "files": [f.to_dict() for f in self.files],
            "stored_at": rfc3339(self.stored_at),
            "event_ids": sorted(set(self.event_ids)),
            "source": self.source,
            "expected_items": self.expected_items,
            "counts_match": self.counts_match,
            "batch": self.batch,
            "receiver_version": self.receiver_version,
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Read a manifest written by this or an earlier version; missing optional fields are None."""
        return cls(
            batch_id=str(data["batch_id"]),
            status=str(data.get("status", "")),
            files=tuple(StoredFile.from_dict(f) for f in data.get("files", [])),
            stored_at=parse_rfc3339(str(data["stored_at"])),
            event_ids=tuple(data.get("event_ids", [])),
            source=data.get("source"),
            expected_items=data.get("expected_items"),
            batch=dict(data.get("batch") or {}),
            receiver_version=str(data.get("receiver_version", "")),
            recorded_counts_match=data.get("counts_match"),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        return cls.from_dict(json.loads(data))


def read_manifest(storage: Storage, batch_id: str) -> Manifest | None:
    """The batch's manifest as stored, or None when it has none (not stored, or not yet).

    Only a missing manifest is None: a storage outage or a refused read raises, so a caller never
    mistakes "cannot tell" for "not stored".
    """
    try:
        data = storage.get_bytes(layout.manifest_key(batch_id))
    except ObjectNotFound:
        return None
    return Manifest.from_bytes(data)


def stored_batch_ids(storage: Storage) -> Iterator[str]:
    """The ids of the batches that have a manifest, in storage's listing order (a stray file whose
    name is no batch id is left out)."""
    for key in storage.list_keys(layout.MANIFESTS + "/"):
        batch_id = key.rpartition("/")[2].removesuffix(".json")
        if key.endswith(".json") and layout.is_batch_id(batch_id):
            yield batch_id


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))

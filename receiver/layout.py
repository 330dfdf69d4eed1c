"""Where things live in storage: the keys of results, errors, manifests and files being written.

This is the layout downstream jobs read (docs/architecture.md, "The public interface"); changing a key here breaks
them. Hive-style `dt=`/`batch_id=` folders let DuckDB, Spark and Athena read the results in place.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re

from .errors import UnsafeBatchId

#: A batch id is one path segment: letters, digits, `_`, `-`, `.` (not `.`/`..`), at most 200.
_BATCH_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")

RESULTS = "results"
ERRORS = "errors"
MANIFESTS = "manifests"


def is_batch_id(batch_id: object) -> bool:
    """Whether `batch_id` is safe as a single storage path segment."""
    return isinstance(batch_id, str) and _BATCH_ID.fullmatch(batch_id) is not None and ".." not in batch_id


def validate_batch_id(batch_id: object) -> str:
    """Return `batch_id` if it is safe as a single storage path segment, else raise."""
    if not is_batch_id(batch_id):
        raise UnsafeBatchId(
            "batch id must be 1-200 characters of letters, digits, '_', '-' and '.', with no '..'",
            {"batch_id": ["not a safe batch id"]},
        )
    assert isinstance(batch_id, str)
    return batch_id


def partition_date(stored_at: dt.datetime) -> str:
    return stored_at.astimezone(dt.UTC).strftime("%Y-%m-%d")


def results_key(batch_id: str, day: str, suffix: str = ".jsonl") -> str:
    """`results/dt=…/batch_id=…/results.jsonl` (or `.jsonl.gz` for a compressed artifact)."""
    return f"{RESULTS}/dt={day}/batch_id={validate_batch_id(batch_id)}/results{suffix}"


def errors_key(batch_id: str, day: str, suffix: str = ".jsonl") -> str:
    return f"{ERRORS}/dt={day}/batch_id={validate_batch_id(batch_id)}/errors{suffix}"


def manifest_key(batch_id: str) -> str:
    return f"{MANIFESTS}/{validate_batch_id(batch_id)}.json"


#: The folder (under the root, on the same file system) that holds every file being written, so
#: housekeeping finds them without walking the stored batches.
PARTIAL = ".partial"


def part_key(final_key: str, job_token: str) -> str:
    """The name a file has while it is written: in `.partial/`, never ending in `.jsonl`/`.jsonl.gz`.

    Named by a digest of its final folder (batch ids are up to 200 characters: a name spelled from
    the whole key could pass the file system's 255), then the final name and the writer's token, so
    the part files of one folder are found by name alone (`part_prefix`)."""
    folder, _, name = final_key.rpartition("/")
    return f"{part_prefix(folder)}{name}.{job_token}.part"


def part_prefix(folder: str) -> str:
    """The start of the part-file keys of every file being written into `folder`."""
    digest = hashlib.sha256(folder.strip("/").encode()).hexdigest()[:24]
    return f"{PARTIAL}/{digest}."


def is_part_key(key: str) -> bool:
    """A file being written: in `.partial/`, or hidden and ending in `.part` beside its final key
    (where earlier versions wrote them)."""
    return key.startswith(PARTIAL + "/") or (key.rpartition("/")[2].startswith(".") and key.endswith(".part"))


def suffix_for(url_path: str, content_type: str | None, content_encoding: str | None = None) -> str:
    """`.jsonl.gz` when the artifact is gzip (by its name or its Content-Type), else `.jsonl`.

    A `Content-Encoding: gzip` artifact is decoded in transit by no one (we read raw bytes), so its
    stored bytes are gzip too and keep the suffix that says so.
    """
    path = url_path.lower()
    ctype = (content_type or "").lower()
    if path.endswith(".gz") or "gzip" in ctype or (content_encoding or "").lower() == "gzip":
        return ".jsonl.gz"
    return ".jsonl"

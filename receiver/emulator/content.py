"""Deterministic artifacts of any size, generated while they are sent.

Benchmarks fetch gigabyte artifacts from the emulator, so nothing here holds a whole file in memory
and generation must outrun the network (several hundred MB/s on one core). Every line of a file has
the same length, which makes a byte offset map straight to a line number: a Range request costs no
more than a request from the start. A chunk of lines is made by copying a block of identical
template lines and then writing the item numbers in, one digit column at a time, with strided slice
assignment; Python never loops over lines.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from collections.abc import Iterator
from typing import Any

#: Bytes per generated chunk: big enough that per-chunk overhead vanishes, small enough for memory.
CHUNK_BYTES = 1 << 20

NDJSON = "application/x-ndjson"
GZIP = "application/gzip"

_DIGITS = [bytes([48 + d]) for d in range(10)]
#: Digit columns whose period (10 ** (p + 1)) is at most this are cut from a precomputed pattern.
_PATTERN_PERIOD_LIMIT = 10_000


class _Template:
    """One kind of line: `head` + item number + `middle` + padding + `tail`."""

    def __init__(self, head: str, middle: str, tail: str, pad: str = "x") -> None:
        self.head = head.encode()
        self.middle = middle.encode()
        self.tail = tail.encode()
        self.pad = pad.encode()

    def fixed_bytes(self, width: int) -> int:
        return len(self.head) + width + len(self.middle) + len(self.tail)

    def line(self, line_bytes: int, width: int) -> bytes:
        padding = line_bytes - self.fixed_bytes(width)
        if padding < 0:
            raise ValueError(f"line_bytes must be at least {self.fixed_bytes(width)}")
        return self.head + b"0" * width + self.middle + self.pad * padding + self.tail


_ID = '{"customer_item_id":"item-'
RESULT_OK = _Template(_ID, '","status":"succeeded","output":{"text":"', '"}}\n')
RESULT_FAILED = _Template(_ID, '","status":"failed","error":{"code":"provider_error","message":"Provider error ', '"}}\n')
ERROR_LINE = _Template(_ID, '","error":{"code":"provider_error","message":"Provider error ', '"}}\n')


def id_width(items: int) -> int:
    """Digits in `item-NNNNNNNN`: eight, or more when the batch is that large."""
    return max(8, len(str(items)))


def min_line_bytes(items: int, error_items: int = 0) -> int:
    """The shortest line every template of such a batch fits in."""
    width = id_width(items)
    templates = [RESULT_OK] + ([RESULT_FAILED, ERROR_LINE] if error_items else [])
    return max(t.fixed_bytes(width) for t in templates)


class _Run:
    """`count` consecutive lines from one template, numbered from `first`."""

    def __init__(self, template: _Template, first: int, count: int, line_bytes: int, width: int):
        self.first = first
        self.count = count
        self.line_bytes = line_bytes
        self.width = width
        self._line = template.line(line_bytes, width)
        self._digits_at = len(template.head)
        self._per_chunk = max(1, CHUNK_BYTES // line_bytes)
        self._block = self._line * min(self._per_chunk, max(count, 1))
        self._patterns: dict[int, bytes] = {}

    def chunk(self, offset: int, k: int) -> bytes:
        """Lines `offset .. offset + k - 1` of this run (k at most one chunk's worth)."""
        size = k * self.line_bytes
        buf = bytearray(self._block[:size] if size <= len(self._block) else self._line * k)
        number = self.first + offset
        for p in range(self.width):
            column = self._digit_column(number, k, p)
            start = self._digits_at + self.width - 1 - p
            buf[start :: self.line_bytes] = column
        return bytes(buf)

    def _digit_column(self, number: int, k: int, p: int) -> bytes:
        """Digit `p` (0 = units) of each of `number .. number + k - 1`, as ASCII bytes."""
        unit = 10**p
        period = unit * 10
        if period <= _PATTERN_PERIOD_LIMIT:
            pattern = self._patterns.get(p)
            if pattern is None:
                one = b"".join(d * unit for d in _DIGITS)
                pattern = one * (self._per_chunk // period + 2)
                self._patterns[p] = pattern
            start = number % period
            return pattern[start : start + k]
        parts = []
        done = 0
        while done < k:
            n = number + done
            run = min(unit - n % unit, k - done)
            parts.append(_DIGITS[(n // unit) % 10] * run)
            done += run
        return b"".join(parts)


class Artifact:
    """One generated JSONL file: a sequence of runs of equal-length lines."""

    content_type = NDJSON

    def __init__(self, name: str, runs: list[_Run], line_bytes: int) -> None:
        self.name = name
        self.line_bytes = line_bytes
        self._runs = [r for r in runs if r.count]
        self.lines = sum(r.count for r in self._runs)
        self.size = self.lines * line_bytes
        self._digest: dict[str, Any] | None = None
        self._digest_lock = threading.Lock()

    def iter_bytes(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """Bytes `start .. stop - 1` in chunks of about :data:`CHUNK_BYTES`."""
        stop = self.size if stop is None else min(stop, self.size)
        if start >= stop:
            return
        width = self.line_bytes
        per_chunk = max(1, CHUNK_BYTES // width)
        line = start // width
        last_line = -(-stop // width)
        while line < last_line:
            k = min(per_chunk, last_line - line)
            data = self._lines(line, k)
            base = line * width
            lo = max(start - base, 0)
            hi = min(stop - base, len(data))
            yield data if lo == 0 and hi == len(data) else data[lo:hi]
            line += k

    def _lines(self, line: int, k: int) -> bytes:
        parts = []
        offset = 0
        for run in self._runs:
            if k == 0:
                break
            if line >= offset + run.count:
                offset += run.count
                continue
            take = min(k, offset + run.count - line)
            parts.append(run.chunk(line - offset, take))
            line += take
            k -= take
            offset += run.count
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, start: int = 0, stop: int | None = None) -> bytes:
        """Bytes in memory: for small files and tests only."""
        return b"".join(self.iter_bytes(start, stop))

    def rows(self, offset: int, limit: int) -> list[dict[str, Any]]:
        """Parsed lines `offset .. offset + limit - 1`, for the paged results endpoint."""
        stop_line = min(offset + limit, self.lines)
        if offset >= stop_line:
            return []
        data = self.read(offset * self.line_bytes, stop_line * self.line_bytes)
        return [json.loads(line) for line in data.splitlines()]

    def digest(self) -> dict[str, Any]:
        """`{"sha256", "bytes", "lines"}` of the file, computed once by streaming it."""
        with self._digest_lock:
            if self._digest is None:
                sha = hashlib.sha256()
                for chunk in self.iter_bytes():
                    sha.update(chunk)
                self._digest = {"sha256": sha.hexdigest(), "bytes": self.size, "lines": self.lines}
            return dict(self._digest)

    @property
    def digest_is_cheap(self) -> bool:
        return self.size <= 8 * CHUNK_BYTES


class GzipArtifact:
    """A gzip copy of an :class:`Artifact`, compressed in memory on first use.

    Only meant for small batches; `mtime=0` keeps the bytes (and so the digest) deterministic.
    `lines` counts the lines of the uncompressed content.
    """

    content_type = GZIP
    digest_is_cheap = True

    def __init__(self, inner: Artifact) -> None:
        self.name = inner.name + ".gz"
        self.inner = inner
        self.lines = inner.lines
        self._data: bytes | None = None
        self._lock = threading.Lock()

    @property
    def data(self) -> bytes:
        with self._lock:
            if self._data is None:
                self._data = gzip.compress(self.inner.read(), mtime=0)
            return self._data

    @property
    def size(self) -> int:
        return len(self.data)

    def iter_bytes(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        data = self.data
        stop = len(data) if stop is None else min(stop, len(data))
        for at in range(start, stop, CHUNK_BYTES):
            yield data[at : min(at + CHUNK_BYTES, stop)]

    def rows(self, offset: int, limit: int) -> list[dict[str, Any]]:
        return self.inner.rows(offset, limit)

    def digest(self) -> dict[str, Any]:
        data = self.data
        return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "lines": self.lines}


AnyArtifact = Artifact | GzipArtifact


def results_file(items: int, line_bytes: int, error_items: int = 0, compress: bool = False) -> AnyArtifact:
    """`results.jsonl`: every item, the last `error_items` of them failed.

    BatchRouter's older docs say failed items appear in the output file with a structured error code
    (test.batchrouter.com/docs/sla), so the results file has one line per item whatever happened.
    """
    width = id_width(items)
    ok = items - error_items
    runs = [_Run(RESULT_OK, 1, ok, line_bytes, width)]
    if error_items:
        runs.append(_Run(RESULT_FAILED, ok + 1, error_items, line_bytes, width))
    artifact = Artifact("results.jsonl", runs, line_bytes)
    return GzipArtifact(artifact) if compress else artifact


def errors_file(items: int, line_bytes: int, error_items: int, compress: bool = False) -> AnyArtifact | None:
    """`errors.jsonl`: one line per failed item, or None when no item failed."""
    if not error_items:
        return None
    width = id_width(items)
    runs = [_Run(ERROR_LINE, items - error_items + 1, error_items, line_bytes, width)]
    artifact = Artifact("errors.jsonl", runs, line_bytes)
    return GzipArtifact(artifact) if compress else artifact

"""What a stored file is worth recording: bytes, SHA-256 and lines, counted as the bytes go by.

Shared by the artifact download and the results pages, so a file's figures mean the same whichever
way it arrived. Lines are those of the text: of the decompressed text for a gzip artifact.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import CorruptArtifact

#: Most decompressed bytes produced at once while counting the lines of a gzip artifact: bounds
#: memory however well a block compresses.
_INFLATE_CHUNK = 4 << 20


@dataclass(frozen=True)
class TransferResult:
    """What was stored: the figures that go into the manifest."""

    bytes: int
    sha256: str
    #: Lines of the text: of the decompressed text for a gzip artifact.
    lines: int
    #: ``.jsonl`` or ``.jsonl.gz`` (layout.suffix_for).
    suffix: str


class LineCounter:
    """Counts lines fed in blocks: newlines, plus one for a last line without a newline."""

    def __init__(self) -> None:
        self.newlines = 0
        self.last = b"\n"

    def feed(self, block: bytes) -> None:
        if block:
            self.newlines += block.count(b"\n")
            self.last = block[-1:]

    def finish(self) -> int:
        return self.newlines + (self.last != b"\n")


class GzipLineCounter(LineCounter):
    """Counts the lines of the decompressed text of gzip bytes, streaming, in bounded memory.

    The compressed bytes are what is stored; this only reads them. A file of several gzip members
    (RFC 1952 §2.2, what ``cat a.gz b.gz`` makes) is counted whole.
    """

    def __init__(self) -> None:
        super().__init__()
        self._inflate = zlib.decompressobj(wbits=31)
        self._seen_input = False

    def feed(self, block: bytes) -> None:
        data = block
        self._seen_input = self._seen_input or bool(block)
        try:
            while True:
                if self._inflate.eof:
                    if not data:
                        return
                    self._inflate = zlib.decompressobj(wbits=31)  # the next member
                out = self._inflate.decompress(data, _INFLATE_CHUNK)
                super().feed(out)
                if self._inflate.eof:
                    data = self._inflate.unused_data
                    continue
                data = self._inflate.unconsumed_tail
                if not data and len(out) < _INFLATE_CHUNK:
                    return
        except zlib.error as exc:
            raise CorruptArtifact(f"the gzip artifact does not decompress: {exc}") from None

    def finish(self) -> int:
        if self._seen_input and not self._inflate.eof:
            raise CorruptArtifact("the gzip artifact ends in the middle of its compressed stream")
        return super().finish()


def tally(blocks: Iterable[bytes], suffix: str) -> TransferResult:
    """The figures of a file already stored, read back block by block: how a worker adopts what an
    earlier attempt committed instead of downloading it again."""
    sha256 = hashlib.sha256()
    counter = GzipLineCounter() if suffix.endswith(".gz") else LineCounter()
    size = 0
    for block in blocks:
        sha256.update(block)
        counter.feed(block)
        size += len(block)
    return TransferResult(bytes=size, sha256=sha256.hexdigest(), lines=counter.finish(), suffix=suffix)

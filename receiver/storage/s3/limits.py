"""S3's multipart limits and the part sizes and memory budget chosen within them.

The limits come from the S3 User Guide, "Amazon S3 multipart upload limits": parts of 5 MiB to
5 GiB (the last may be smaller), at most 10,000 parts, objects up to 5 TiB.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

#: S3 multipart upload limits (S3 User Guide, "Amazon S3 multipart upload limits").
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * TiB

#: s3transfer's default `multipart_chunksize`; S3 suggests 8-16 MiB parts for throughput.
DEFAULT_PART_SIZE = 8 * MiB
#: Two 8 MiB parts in flight and one filling: as fast as 64 MiB against moto_server, a third of the
#: memory (BENCHMARKS.md, "Streaming to S3").
DEFAULT_BUFFER_BYTES = 24 * MiB
#: Part uploads in flight per writer at most (the memory budget usually binds first).
DEFAULT_CONCURRENCY = 8
#: Without a size hint the part size doubles every this many parts: 8 MiB x 1000, 16 MiB x 1000, …
#: 4 GiB x 1000 holds 7.99 TiB within 10,000 parts, above S3's 5 TiB object limit.
PARTS_PER_TIER = 1000


def part_size_for(part_number: int, size_hint: int | None, base: int = DEFAULT_PART_SIZE) -> int:
    """The size of part `part_number` (1-based) so an object never needs more than 10,000 parts.

    With a size hint (the artifact's Content-Length) every part has the same size: `base`, or
    size_hint / 10,000 rounded up to a MiB when that is larger (a 500 GB artifact gets 48 MiB parts,
    9,934 of them). Without one, assume the worst: the size doubles every 1,000 parts, so the first
    8 GiB go in 8 MiB parts and 5 TiB still fits (parts never exceed 4 GiB < S3's 5 GiB).
    """
    if size_hint is not None:
        spread = -(-size_hint // MAX_PARTS)
        return max(base, -(-spread // MiB) * MiB)
    return min(MAX_PART_SIZE, base << ((part_number - 1) // PARTS_PER_TIER))

"""A storage root in an S3 bucket (`s3://bucket/prefix`), or any S3-compatible store.

- storage.py: `S3Storage`, the Storage interface over one bucket and prefix;
- writer.py: `S3Writer`, one object streamed into a multipart upload within a memory budget;
- limits.py: S3's multipart limits and the part sizes chosen within them;
- errors.py: botocore's exceptions translated into the StorageError family;
- client.py: `make_client`, the boto3 client with the retries, timeouts and pool a stream needs;
- lifecycle.py: whether the bucket aborts the incomplete uploads a killed process leaves.
"""

from __future__ import annotations

from .client import make_client
from .limits import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_CONCURRENCY,
    DEFAULT_PART_SIZE,
    MAX_OBJECT_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    GiB,
    KiB,
    MiB,
    TiB,
    part_size_for,
)
from .storage import S3Storage
from .writer import S3Writer

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_PART_SIZE",
    "MAX_OBJECT_SIZE",
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "GiB",
    "KiB",
    "MiB",
    "S3Storage",
    "S3Writer",
    "TiB",
    "make_client",
    "part_size_for",
]

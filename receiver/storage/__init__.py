"""Storage backends behind one interface: a local folder or an S3 bucket."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import parse_storage_url
from .base import Storage, Writer

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Storage", "Writer", "open_storage", "storage_from_url"]


def open_storage(settings: Settings) -> Storage:
    """The backend for `settings.storage_url` (validated by config: a path, file:// or s3://)."""
    return storage_from_url(
        settings.storage_url,
        sse=settings.s3.sse,
        kms_key_id=settings.s3.kms_key_id,
        checksum=settings.s3.checksum,
        buffer_bytes=settings.s3.buffer_bytes,
    )


def storage_from_url(url: str, **s3_options: Any) -> Storage:
    """The backend for a storage root URL alone (a reader needs no other setting); `s3_options`
    are S3Storage's writing options. The schemes are config.STORAGE_SCHEMES; ConfigError for others."""
    location = parse_storage_url(url)
    if location.backend == "s3":
        from .s3 import S3Storage

        return S3Storage(bucket=location.bucket, prefix=location.path, **s3_options)
    from .local import LocalStorage

    return LocalStorage(location.path)

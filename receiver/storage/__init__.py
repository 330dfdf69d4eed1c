"""Storage backends behind one interface: a local folder or an S3 bucket."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from ..config import Settings
from .base import Storage, Writer

__all__ = ["Storage", "Writer", "open_storage"]


def open_storage(settings: Settings) -> Storage:
    """The backend for `settings.storage_url` (validated by config: a path, file:// or s3://)."""
    url = settings.storage_url
    parts = urlsplit(url)
    if parts.scheme == "s3":
        from .s3 import S3Storage

        return S3Storage(
            bucket=parts.netloc,
            prefix=parts.path.strip("/"),
            sse=settings.s3_sse,
            kms_key_id=settings.s3_kms_key_id,
            checksum=settings.s3_checksum,
            buffer_bytes=settings.s3_buffer_bytes,
        )
    from .local import LocalStorage

    path = unquote(parts.path) if parts.scheme == "file" else url
    return LocalStorage(path)

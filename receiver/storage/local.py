"""A storage root on the local file system (or any mount that behaves like one).

A writer fills a part file in `{root}/.partial/` and renames it into place on commit, after an fsync
of the file; both directories are fsynced after the rename. That is the classic recipe for a file
that is either absent or whole after a crash (rename(2) is atomic within one file system, and
`.partial/` is under the root, so on the same one; the directory fsync makes the rename itself
durable, see fsync(2) "Calling fsync() does not necessarily ensure that the entry in the directory
containing the file has also reached disk").

Part files are named by `layout.part_key`: in `.partial/`, ending in `.part`, so globs of the layout
(`results/dt=*/batch_id=*/*.jsonl`) never see one, and housekeeping lists one folder of files in
flight instead of walking every stored batch.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import BinaryIO

from .. import layout
from ..errors import ObjectNotFound, StorageError, StoragePermissionError, StorageUnavailable
from .base import Storage, Writer

__all__ = ["LocalStorage", "LocalWriter"]

log = logging.getLogger(__name__)

#: Size of the write buffer and of the blocks `open_read` yields. Large blocks keep the per-call
#: overhead of Python small next to the disk's bandwidth (docs/benchmarking.md, "Streaming to local
#: storage").
BLOCK_SIZE = 1024 * 1024

#: Every this many bytes a writer asks the kernel to start writing its file out, and to drop what is
#: already on disk from the page cache (posix_fadvise DONTNEED, which starts writeback of dirty pages
#: without waiting on Linux). Otherwise a 1 GB artifact sits dirty in memory (the kernel's background
#: writeback starts at 10% of RAM) and commit's fsync writes it all at the end, a long stall
#: (BENCHMARKS.md, "Streaming to local storage"). Advisory only: commit still fsyncs before the rename.
WRITEBACK_BYTES = 16 * 1024 * 1024
_FADVISE = getattr(os, "posix_fadvise", None)

#: Out of space or a failing device: may clear up (an operator frees space, a network mount returns).
_TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ENOMEM, errno.ESTALE, errno.ETIMEDOUT}
)
#: The file system refuses us: an operator must fix permissions or the mount.
_PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
#: Our own mistake or a layout the file system cannot hold: retrying changes nothing.
_PERMANENT_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.ELOOP})
#: `os.link` on a file system without hard links (vfat, some FUSE and SMB mounts).
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK})


def _storage_error(exc: OSError, path: str, doing: str) -> StorageError:
    """Name the failure by its errno family; the worker retries only the transient ones."""
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    reason = exc.strerror or str(exc)
    if exc.errno in _PERMISSION_ERRNOS:
        return StoragePermissionError(
            f"cannot {doing} {path}: {reason} ({code}); give the receiver write access to the storage root"
        )
    if exc.errno == errno.ENOENT and doing == "read":
        return ObjectNotFound(f"{path} does not exist")
    if exc.errno in _PERMANENT_ERRNOS:
        return StorageError(f"cannot {doing} {path}: {reason} ({code})")
    if exc.errno in _TRANSIENT_ERRNOS:
        return StorageUnavailable(f"cannot {doing} {path}: {reason} ({code})")
    # An errno we did not foresee: retrying a few times is cheaper than a batch wrongly given up.
    return StorageUnavailable(f"cannot {doing} {path}: {reason} ({code})")


def _fsync_dir(path: str) -> None:
    """Make a rename or link in `path` durable. Not possible on Windows, where it is a no-op."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


class LocalStorage(Storage):
    """Files under `root`; keys are relative POSIX paths (`results/dt=…/…/results.jsonl`)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.url = self.root

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    # --- keys -------------------------------------------------------------------------------------

    def path_for(self, key: str) -> str:
        """The file path of `key`, refusing any key that could leave the root."""
        return os.path.join(self.root, *_key_parts(key))

    def _part_path(self, key: str, token: str) -> str:
        """The part file of `key`, in `.partial/` under the root (the same file system)."""
        if "/" in token:
            raise ValueError(f"writer token {token!r} must not contain '/'")
        return self.path_for(layout.part_key(key, token))

    # --- writing ----------------------------------------------------------------------------------

    def open_writer(self, key: str, *, token: str, size_hint: int | None = None) -> LocalWriter:
        final = self.path_for(key)
        part = self._part_path(key, token)
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.makedirs(os.path.dirname(part), exist_ok=True)
            handle = open(part, "wb", buffering=BLOCK_SIZE)  # noqa: SIM115 - owned by the writer
        except OSError as exc:
            raise _storage_error(exc, part, "write") from exc
        return LocalWriter(key, final, part, handle)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Publish `data` at `key` unless it exists: write a part file, fsync, then `os.link` it.

        link(2) fails with EEXIST when the target exists and is atomic, so two workers can never both
        publish, and a reader sees either nothing or the whole file. On a file system without hard
        links (vfat, some FUSE/SMB mounts) it falls back to an exclusive create (O_EXCL) of the final
        name and writes into it: still exclusive, but a reader may briefly see a short file.
        """
        final = self.path_for(key)
        folder = os.path.dirname(final)
        temp = self._part_path(key, f"put-{uuid.uuid4().hex}")
        try:
            os.makedirs(folder, exist_ok=True)
            os.makedirs(os.path.dirname(temp), exist_ok=True)
            _write_synced(temp, data, exclusive=True)
        except OSError as exc:
            _unlink_quietly(temp)
            raise _storage_error(exc, final, "write") from exc
        try:
            os.link(temp, final)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise _storage_error(exc, final, "write") from exc
            log.info("%s: no hard links on this file system (%s); publishing with O_EXCL", folder, exc)
            try:
                _write_synced(final, data, exclusive=True)
            except FileExistsError:
                return False
            except OSError as exc2:
                raise _storage_error(exc2, final, "write") from exc2
        finally:
            _unlink_quietly(temp)
        try:
            _fsync_dir(folder)
        except OSError as exc:
            raise _storage_error(exc, folder, "sync") from exc
        return True

    # --- reading ----------------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        path = self.path_for(key)
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise _storage_error(exc, path, "read") from exc

    def exists(self, key: str) -> bool:
        return os.path.isfile(self.path_for(key))

    def open_read(self, key: str) -> Iterator[bytes]:
        """Open now (so a missing key raises ObjectNotFound here), then yield 1 MiB blocks."""
        path = self.path_for(key)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except OSError as exc:
            raise _storage_error(exc, path, "read") from exc
        return _blocks(handle, path)

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys whose relative path starts with `prefix`; part files (writes in progress) are left out."""
        if prefix:
            _key_parts(prefix.rstrip("/") or ".")  # the same refusal of escapes as a key
        folder, _, _ = prefix.rpartition("/")
        start = os.path.join(self.root, *folder.split("/")) if folder else self.root
        for dirpath, dirnames, filenames in os.walk(start):
            if dirpath == self.root and layout.PARTIAL in dirnames:
                dirnames.remove(layout.PARTIAL)
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in sorted(filenames):
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix) and not layout.is_part_key(key):
                    yield key

    # --- housekeeping -----------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _storage_error(exc, path, "delete") from exc

    def check(self) -> None:
        """Create the root if needed, then write, fsync and delete a probe file in it."""
        probe = os.path.join(self.root, f".receiver-probe.{uuid.uuid4().hex}.part")
        try:
            os.makedirs(self.root, exist_ok=True)
            _write_synced(probe, b"ok\n", exclusive=True)
        except OSError as exc:
            raise _storage_error(exc, self.root, "write to") from exc
        finally:
            _unlink_quietly(probe)

    def cleanup_partials(self, older_than_seconds: float = 0, *, prefix: str = "") -> int:
        """Delete part files whose mtime is older than the given age: every one in `.partial/`, or
        with `prefix` (a folder of the layout) those of files being written into that folder.

        Lists `.partial/` (the files in flight) and, for a folder, that folder itself (where earlier
        versions wrote part files beside their final key); never walks the stored batches."""
        cutoff = time.time() - older_than_seconds
        folder = prefix.strip("/")
        start = layout.part_prefix(folder).rpartition("/")[2] if folder else ""
        partial_dir = self.path_for(layout.PARTIAL)
        candidates = [os.path.join(partial_dir, n) for n in _listdir(partial_dir) if n.startswith(start)]
        if folder:
            beside = self.path_for(folder)
            candidates += [os.path.join(beside, n) for n in _listdir(beside) if layout.is_part_key(n)]
        removed = 0
        for path in candidates:
            try:
                if os.lstat(path).st_mtime <= cutoff:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue  # its writer committed or aborted meanwhile
            except OSError as exc:
                raise _storage_error(exc, path, "delete") from exc
        return removed


def _listdir(path: str) -> list[str]:
    """The names in `path`; none when it does not exist (nothing was ever written there)."""
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _storage_error(exc, path, "list") from exc


class LocalWriter(Writer):
    """A part file that becomes `key` on commit. One thread at a time."""

    def __init__(self, key: str, final_path: str, part_path: str, handle: BinaryIO) -> None:
        self.key = key
        self.bytes_written = 0
        self.path = final_path
        self.part_path = part_path
        self._handle: BinaryIO | None = handle
        self._state = "open"
        # A writer dropped without commit() or abort() (a crashed job) leaves no part file behind.
        self._finalizer = weakref.finalize(self, _discard, handle, part_path)
        self._written_back = 0

    def __repr__(self) -> str:
        return f"<LocalWriter {self.key!r} {self._state}, {self.bytes_written} bytes>"

    def write(self, data: bytes) -> None:
        if self._handle is None:
            raise ValueError(f"write to a {self._state} writer ({self.key})")
        try:
            self._handle.write(data)
        except OSError as exc:
            self.abort()  # free the space a full disk needs back
            raise _storage_error(exc, self.part_path, "write") from exc
        self.bytes_written += len(data)
        if self.bytes_written - self._written_back >= WRITEBACK_BYTES:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Start writeback of the bytes written since the last call; drop the window before it."""
        end = self.bytes_written
        start = max(0, self._written_back - WRITEBACK_BYTES)  # by now mostly on disk: dropped
        self._written_back = end
        if _FADVISE is None or self._handle is None:
            return
        try:
            self._handle.flush()
            _FADVISE(self._handle.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError as exc:  # advisory: a file system that refuses it loses nothing but speed
            if exc.errno in _TRANSIENT_ERRNOS:  # the flush hit a full disk: the write's own error
                self.abort()
                raise _storage_error(exc, self.part_path, "write") from exc

    def commit(self) -> None:
        """flush, fsync the file, rename it to the final key, fsync the folder."""
        if self._state == "committed":
            return
        if self._handle is None:
            raise ValueError(f"commit of an {self._state} writer ({self.key})")
        handle = self._handle
        try:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            self._handle = None
            os.replace(self.part_path, self.path)
        except OSError as exc:
            self.abort()
            raise _storage_error(exc, self.path, "write") from exc
        self._state = "committed"
        self._finalizer.detach()
        # The new name first (it is what readers wait for), then the part file's absence.
        for folder in (os.path.dirname(self.path), os.path.dirname(self.part_path)):
            try:
                _fsync_dir(folder)
            except OSError as exc:
                raise _storage_error(exc, folder, "sync") from exc

    def abort(self) -> None:
        """Close and delete the part file; a no-op after commit or a previous abort."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._handle = None
        self._finalizer()


def _discard(handle: BinaryIO, part_path: str) -> None:
    try:
        handle.close()
    except OSError:
        pass  # a close that flushes onto a full disk: the file goes anyway
    _unlink_quietly(part_path)


def _write_synced(path: str, data: bytes, *, exclusive: bool) -> None:
    with open(path, "xb" if exclusive else "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _blocks(handle: BinaryIO, path: str) -> Iterator[bytes]:
    with handle:
        while True:
            try:
                block = handle.read(BLOCK_SIZE)
            except OSError as exc:
                raise _storage_error(exc, path, "read") from exc
            if not block:
                return
            yield block


def _key_parts(key: str) -> list[str]:
    """Split a relative POSIX key into path segments, refusing anything that could leave the root."""
    if not isinstance(key, str) or not key:
        raise ValueError("a storage key is a non-empty relative path")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"storage key {key!r} must be a relative POSIX path inside the storage root")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"storage key {key!r} has an empty, '.' or '..' segment")
    return parts

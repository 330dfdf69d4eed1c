"""What LocalStorage does beyond the storage contract (tests/test_storage.py): a hidden part file
renamed into place, errno turned into named errors, a real full and read-only file system."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver import layout
from receiver.errors import StorageError, StoragePermissionError, StorageUnavailable
from receiver.storage.local import LocalStorage, _storage_error

KEY = "results/dt=2026-01-02/batch_id=b_1/results.jsonl"
MiB = 1024 * 1024


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(str(tmp_path / "root"))


def _layout_glob(root: str) -> list[str]:
    return glob.glob(os.path.join(root, "results/dt=*/batch_id=*/*.jsonl*"))


def test_the_part_file_is_hidden_beside_the_final_key(storage: LocalStorage) -> None:
    digest = hashlib.sha256()
    writer = storage.open_writer(KEY, token="job-1", size_hint=3 * MiB)
    for i in range(3):
        block = bytes([i]) * MiB
        digest.update(block)
        writer.write(block)
    # Mid-write: the part file sits in .partial/ under the root, not matching the layout's globs.
    assert not storage.exists(KEY)
    assert _layout_glob(storage.root) == []
    assert list(storage.list_keys("results/")) == []
    assert list(storage.list_keys()) == []
    folder = os.path.dirname(storage.path_for(KEY))
    assert os.listdir(folder) == []
    (part,) = os.listdir(os.path.join(storage.root, layout.PARTIAL))
    assert part == os.path.basename(layout.part_key(KEY, "job-1"))
    assert layout.is_part_key(f"{layout.PARTIAL}/{part}") and not part.endswith((".jsonl", ".jsonl.gz"))

    writer.commit()
    assert writer.bytes_written == 3 * MiB
    assert os.listdir(folder) == ["results.jsonl"]
    assert hashlib.sha256(storage.get_bytes(KEY)).hexdigest() == digest.hexdigest()
    assert hashlib.sha256(b"".join(storage.open_read(KEY))).hexdigest() == digest.hexdigest()
    assert list(storage.list_keys("results/")) == [KEY]
    writer.commit()  # idempotent


def test_abort_removes_the_part_file_and_is_idempotent(storage: LocalStorage) -> None:
    writer = storage.open_writer(KEY, token="t", size_hint=None)
    writer.write(b"partial\n")
    writer.abort()
    writer.abort()
    assert os.listdir(os.path.dirname(storage.path_for(KEY))) == []
    with pytest.raises(ValueError):
        writer.write(b"more")
    with pytest.raises(ValueError):
        writer.commit()


def test_compressed_part_never_matches_gz_glob(storage: LocalStorage) -> None:
    key = KEY + ".gz"
    writer = storage.open_writer(key, token="t")
    writer.write(b"\x1f\x8b")
    assert _layout_glob(storage.root) == []
    writer.commit()
    assert _layout_glob(storage.root) == [storage.path_for(key)]


def test_put_if_absent_leaves_no_temporary_file(storage: LocalStorage) -> None:
    key = layout.manifest_key("b_1")
    assert storage.put_if_absent(key, b'{"first": true}') is True
    assert storage.put_if_absent(key, b'{"second": true}') is False
    assert os.listdir(os.path.dirname(storage.path_for(key))) == ["b_1.json"]
    assert storage.put_if_absent("top.json", b"{}") is True  # at the root too
    assert sorted(os.listdir(storage.root)) == [layout.PARTIAL, "manifests", "top.json"]
    assert os.listdir(os.path.join(storage.root, layout.PARTIAL)) == []  # no temporary file left


def test_cleanup_partials_by_age(storage: LocalStorage) -> None:
    old = storage.open_writer(KEY, token="old")
    old.write(b"x")
    new = storage.open_writer(KEY.replace("b_1", "b_2"), token="new")
    new.write(b"y")
    done = storage.open_writer(KEY.replace("b_1", "b_3"), token="done")
    done.write(b"z")
    done.commit()
    hour_ago = time.time() - 3600
    os.utime(old.part_path, (hour_ago, hour_ago))

    assert storage.cleanup_partials(older_than_seconds=600) == 1
    assert not os.path.exists(old.part_path)
    assert os.path.exists(new.part_path)
    assert storage.cleanup_partials(older_than_seconds=0) == 1
    assert storage.exists(KEY.replace("b_1", "b_3"))
    assert storage.cleanup_partials() == 0


def test_cleanup_partials_lists_files_in_flight_and_never_walks_stored_batches(storage: LocalStorage) -> None:
    """A part file is found in .partial/ by name; stored batches' folders are not visited, so an
    old-style part file deep in one (a stand-in for a million stored batches) is not even seen,
    until the worker cleans that one folder before a retry."""
    stored = storage.open_writer(KEY.replace("b_1", "b_9"), token="t")
    stored.write(b"done")
    stored.commit()
    beside = os.path.join(os.path.dirname(storage.path_for(KEY)), ".results.jsonl.old-1.part")
    os.makedirs(os.path.dirname(beside))
    Path(beside).write_bytes(b"left by an earlier version")
    inflight = storage.open_writer(KEY.replace("b_1", "b_2"), token="w-1")
    inflight.write(b"x")
    other = storage.open_writer(KEY.replace("b_1", "b_3"), token="w-1")
    other.write(b"y")

    assert storage.cleanup_partials(0, prefix=os.path.dirname(KEY.replace("b_1", "b_2")) + "/") == 1
    assert not os.path.exists(inflight.part_path) and os.path.exists(other.part_path)
    assert storage.cleanup_partials(0) == 1  # the other one; the file beside KEY is not seen
    assert os.path.exists(beside)
    assert storage.cleanup_partials(0, prefix=os.path.dirname(KEY) + "/") == 1
    assert not os.path.exists(beside)
    assert storage.exists(KEY.replace("b_1", "b_9"))


def test_check_creates_the_root_and_leaves_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "a" / "b"))
    storage.check()
    assert os.path.isdir(storage.root)
    assert os.listdir(storage.root) == []


def test_keys_that_could_escape_are_refused_by_exists_too(storage: LocalStorage) -> None:
    """Writes refuse them on every backend (tests/test_storage.py); on disk a read could escape too."""
    for key in ("../escape", "results/../../escape", "/etc/passwd", "./a", "a\x00b", "dir/"):
        with pytest.raises(ValueError):
            storage.exists(key)


def test_token_cannot_move_the_part_file(storage: LocalStorage) -> None:
    with pytest.raises(ValueError):
        storage.open_writer(KEY, token="../../x")


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (errno.ENOSPC, StorageUnavailable),
        (errno.EDQUOT, StorageUnavailable),
        (errno.EIO, StorageUnavailable),
        (errno.EACCES, StoragePermissionError),
        (errno.EPERM, StoragePermissionError),
        (errno.EROFS, StoragePermissionError),
        (errno.ENAMETOOLONG, StorageError),
    ],
)
def test_errno_mapping(code: int, cls: type[StorageError]) -> None:
    error = _storage_error(OSError(code, os.strerror(code)), "/data/results.jsonl", "write")
    assert type(error) is cls
    assert "/data/results.jsonl" in str(error)


# --- a real full and a real read-only file system (tmpfs; needs root and mount permission) --------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_is_transient_and_frees_the_space(tiny_tmpfs: Path) -> None:
    storage = LocalStorage(str(tiny_tmpfs))
    writer = storage.open_writer(KEY, token="t")
    with pytest.raises(StorageUnavailable, match="ENOSPC"):
        for _ in range(4):
            writer.write(b"x" * MiB)
        writer.commit()
    assert not os.path.exists(writer.part_path)
    assert not storage.exists(KEY)
    writer.abort()  # the worker's cleanup after the failure: a no-op
    storage.check()  # the space is back


def test_read_only_file_system_is_a_permission_error(tiny_tmpfs: Path) -> None:
    storage = LocalStorage(str(tiny_tmpfs))
    storage.check()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    with pytest.raises(StoragePermissionError, match="EROFS") as info:
        storage.open_writer(KEY, token="t")
    assert str(tiny_tmpfs) in str(info.value)
    with pytest.raises(StoragePermissionError):
        storage.put_if_absent("manifests/x.json", b"{}")
    with pytest.raises(StoragePermissionError):
        storage.check()

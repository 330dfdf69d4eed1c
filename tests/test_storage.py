"""The storage contract (receiver/storage/base.py), one set of tests over every backend: a local
folder, moto_server and SeaweedFS (a real S3 server), each over real connections.

What only one backend has (part files and errno on disk; part sizes, checksums, encryption and
outages on S3) is in tests/test_storage_local.py and tests/test_storage_s3.py.
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver import layout
from receiver.errors import ObjectNotFound
from receiver.storage import Storage
from receiver.storage.local import LocalStorage
from receiver.storage.s3 import S3Storage, make_client

from .conftest import S3_SERVERS

KEY = "results/dt=2026-01-02/batch_id=b_1/results.jsonl"
MiB = 1024 * 1024


@pytest.fixture(params=[pytest.param("local"), *S3_SERVERS])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """An empty storage root of each kind: a folder, or a prefix in a new bucket. S3 parts are
    5 MiB (S3's least), so a few MiB already take the multipart path."""
    if request.param == "local":
        yield LocalStorage(str(tmp_path / "root"))
        return
    endpoint = request.getfixturevalue(f"{request.param}_s3")
    bucket = endpoint.new_bucket()
    with endpoint.environment():
        client = make_client(endpoint_url=endpoint.url, max_attempts=2)
        yield S3Storage(bucket, "tenant/prod", client=client, part_size=5 * MiB, buffer_bytes=20 * MiB)


def _blocks(count: int, size: int = MiB) -> Iterator[bytes]:
    for i in range(count):
        yield hashlib.sha256(str(i).encode()).digest() * (size // 32)


def _nothing_visible(storage: Storage, key: str) -> bool:
    return not storage.exists(key) and list(storage.list_keys("results/")) == []


def test_round_trip_invisible_until_commit(storage: Storage) -> None:
    digest = hashlib.sha256()
    writer = storage.open_writer(KEY, token="job-1", size_hint=12 * MiB)
    for block in _blocks(12):  # three S3 parts
        digest.update(block)
        writer.write(block)
    assert _nothing_visible(storage, KEY)
    with pytest.raises(ObjectNotFound):
        storage.get_bytes(KEY)

    writer.commit()
    assert writer.bytes_written == 12 * MiB
    assert hashlib.sha256(storage.get_bytes(KEY)).hexdigest() == digest.hexdigest()
    assert hashlib.sha256(b"".join(storage.open_read(KEY))).hexdigest() == digest.hexdigest()
    assert list(storage.list_keys("results/")) == [KEY]


def test_empty_small_and_odd_sized_writes(storage: Storage) -> None:
    empty = storage.open_writer(KEY, token="t", size_hint=0)
    empty.commit()
    assert storage.get_bytes(KEY) == b""

    small = storage.open_writer(KEY + ".gz", token="t")
    small.write(b'{"a": 1}\n')
    small.write(bytearray(b"{}\n"))
    small.commit()
    assert storage.get_bytes(KEY + ".gz") == b'{"a": 1}\n{}\n'

    data = os.urandom(11 * MiB + 12345)
    odd = storage.open_writer(KEY.replace("b_1", "b_2"), token="t")  # no size hint
    for start in range(0, len(data), 777_777):
        odd.write(data[start : start + 777_777])
    odd.commit()
    assert storage.get_bytes(KEY.replace("b_1", "b_2")) == data


def test_abort_leaves_nothing_and_is_idempotent(storage: Storage) -> None:
    writer = storage.open_writer(KEY, token="t")
    for block in _blocks(11):
        writer.write(block)
    writer.abort()
    writer.abort()
    assert _nothing_visible(storage, KEY)
    assert storage.cleanup_partials(older_than_seconds=0) == 0  # nothing left behind to clean
    with pytest.raises(ValueError):
        writer.write(b"more")


def test_an_exception_in_the_with_block_aborts(storage: Storage) -> None:
    with pytest.raises(RuntimeError), storage.open_writer(KEY, token="t") as writer:
        for block in _blocks(11):
            writer.write(block)
        raise RuntimeError("download broke")
    assert _nothing_visible(storage, KEY)
    assert storage.cleanup_partials(older_than_seconds=0) == 0


def test_a_dropped_writer_leaves_nothing(storage: Storage) -> None:
    writer = storage.open_writer(KEY, token="t")
    for block in _blocks(6):
        writer.write(block)
    deadline = time.monotonic() + 10
    while getattr(writer, "_in_flight", None) and time.monotonic() < deadline:  # S3 parts on the wire hold the writer
        time.sleep(0.05)
    del writer
    gc.collect()
    assert _nothing_visible(storage, KEY)
    assert storage.cleanup_partials(older_than_seconds=0) == 0


def test_put_if_absent_publishes_once(storage: Storage) -> None:
    key = layout.manifest_key("b_1")
    assert storage.put_if_absent(key, b'{"first": true}') is True
    assert storage.put_if_absent(key, b'{"second": true}') is False
    assert storage.get_bytes(key) == b'{"first": true}'
    assert list(storage.list_keys("manifests/")) == [key]  # nothing else left beside it


def test_missing_keys(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound):
        storage.get_bytes("manifests/nope.json")
    with pytest.raises(ObjectNotFound):
        storage.open_read("manifests/nope.json")  # raised at once, not on first iteration
    assert storage.exists("manifests/nope.json") is False
    storage.delete("manifests/nope.json")


def test_exists_delete_and_list_by_prefix(storage: Storage) -> None:
    for key in ("manifests/a.json", "manifests/b.json", "results/x/results.jsonl"):
        assert storage.put_if_absent(key, b"1")
    assert storage.exists("manifests/a.json") is True
    assert sorted(storage.list_keys("manifests/")) == ["manifests/a.json", "manifests/b.json"]
    assert sorted(storage.list_keys("manifests/a")) == ["manifests/a.json"]
    assert len(list(storage.list_keys(""))) == 3
    storage.delete("manifests/a.json")
    storage.delete("manifests/a.json")
    assert storage.exists("manifests/a.json") is False
    assert sorted(storage.list_keys("manifests")) == ["manifests/b.json"]


def test_keys_that_could_escape_are_refused(storage: Storage) -> None:
    for key in (
        "../escape",
        "results/../../escape",
        "/etc/passwd",
        "a//b",
        "./a",
        "a/./b",
        "",
        "a\\..\\b",
        "a\\b",
        "a\x00b",
        "dir/",
    ):
        with pytest.raises(ValueError):
            storage.open_writer(key, token="t")
        with pytest.raises(ValueError):
            storage.put_if_absent(key, b"x")


def test_check_leaves_nothing(storage: Storage) -> None:
    storage.check()
    assert list(storage.list_keys("")) == []

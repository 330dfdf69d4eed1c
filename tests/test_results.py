"""The results reader (`receiver.results.ResultStore`) over real storage: a folder, moto's S3 and
SeaweedFS's."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver import layout
from receiver.errors import ChecksumMismatch, ConfigError
from receiver.results import ResultStore
from receiver.storage import storage_from_url

from ._stored import store_batch
from .conftest import S3_SERVERS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["local", "file", *S3_SERVERS])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage root URL of each kind the contract names, S3 on each server."""
    if request.param == "local":
        yield str(tmp_path / "storage")
    elif request.param == "file":
        yield (tmp_path / "storage").as_uri()
    else:
        endpoint = request.getfixturevalue(f"{request.param}_s3")
        bucket = endpoint.new_bucket("results")
        with endpoint.environment(AWS_ENDPOINT_URL_S3=endpoint.url):
            yield f"s3://{bucket}/tenant/prod"


def test_rows_stream_in_order_plain_and_gzip(root: str) -> None:
    storage = storage_from_url(root)
    store_batch(storage, "b_plain", 500)
    store_batch(storage, "b_gz", 500, compress=True)
    results = ResultStore(root)
    for batch_id in ("b_plain", "b_gz"):
        rows = list(results.rows(batch_id, verify=True))
        assert [r["n"] for r in rows] == list(range(500))
    with results.open("b_gz") as handle:
        assert gzip.decompress(handle.read()).count(b"\n") == 500


def test_manifests_come_oldest_first(root: str) -> None:
    storage = storage_from_url(root)
    now = dt.datetime.now(dt.UTC)
    store_batch(storage, "b_new", 1, stored_at=now)
    store_batch(storage, "b_old", 1, stored_at=now - dt.timedelta(days=2))
    store_batch(storage, "b_failed", status="failed", stored_at=now - dt.timedelta(days=1))
    assert [m["batch_id"] for m in ResultStore(root).manifests()] == ["b_old", "b_failed", "b_new"]


def test_a_manifest_reads_back_as_written_and_stray_files_are_skipped(root: str) -> None:
    """The reader returns a manifest's fields exactly as the worker wrote them, and a file in
    manifests/ whose name is no batch id (an operator's note) does not break the listing."""
    storage = storage_from_url(root)
    store_batch(storage, "b_1", 3)
    store_batch(storage, "b_failed", status="failed")
    storage.put_if_absent(f"{layout.MANIFESTS}/README.txt", b"written by hand")
    storage.put_if_absent(f"{layout.MANIFESTS}/not a batch.json", b"{}")
    results = ResultStore(root)
    for batch_id in ("b_1", "b_failed"):
        assert results.manifest(batch_id) == json.loads(storage.get_bytes(layout.manifest_key(batch_id)))
    assert sorted(m["batch_id"] for m in results.manifests()) == ["b_1", "b_failed"]


def test_a_storage_url_of_no_known_scheme_is_refused_not_made_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Config and the reader read storage URLs through one list of schemes: `gs://…` is refused
    (it used to become a local folder named `gs:`), and `file://` URLs are unquoted."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="'gs' is not supported"):
        ResultStore("gs://bucket/prefix")
    with pytest.raises(ConfigError, match="needs a bucket"):
        ResultStore("s3:///prefix")
    assert not any(tmp_path.iterdir())
    assert storage_from_url((tmp_path / "a b").as_uri()).root == str(tmp_path / "a b")  # type: ignore[attr-defined]


def test_a_batch_not_stored_or_without_results_is_a_lookup_error(root: str) -> None:
    store_batch(storage_from_url(root), "b_failed", status="failed")
    results = ResultStore(root)
    for batch_id in ("b_unknown", "b_failed"):
        with pytest.raises(LookupError):
            next(results.rows(batch_id))
        with pytest.raises(LookupError):
            results.open(batch_id)
    with pytest.raises(LookupError):
        results.manifest("b_unknown")


def test_verify_raises_when_stored_bytes_differ_from_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    manifest = store_batch(storage_from_url(str(root)), "b_1", 100)
    path = root / manifest.files[0].key
    path.write_bytes(path.read_bytes().replace(b"item-7", b"item-8"))
    assert len(list(ResultStore(str(root)).rows("b_1"))) == 100  # unverified by default
    with pytest.raises(ChecksumMismatch):
        list(ResultStore(str(root)).rows("b_1", verify=True))


def test_storage_url_comes_from_the_environment_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_batch(storage_from_url(str(tmp_path / "elsewhere")), "b_env", 3)
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("RECEIVER_STORAGE_URL", str(tmp_path / "elsewhere"))
    assert len(list(ResultStore().rows("b_env"))) == 3


def test_the_reader_imports_neither_flask_nor_gunicorn() -> None:
    code = (
        "import sys, receiver.results\n"
        "loaded = [m for m in ('flask', 'gunicorn', 'gevent', 'werkzeug') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _peak_reading(root: str, batch_id: str) -> tuple[int, int]:
    tracemalloc.start()
    try:
        count = sum(1 for _ in ResultStore(root).rows(batch_id, verify=True))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reading_memory_stays_flat(tmp_path: Path) -> None:
    root = str(tmp_path / "storage")
    storage = storage_from_url(root)
    store_batch(storage, "b_small", 1_000, pad=200)  # ~0.25 MB
    store_batch(storage, "b_large", 160_000, pad=200)  # ~40 MB
    small, small_peak = _peak_reading(root, "b_small")
    large, large_peak = _peak_reading(root, "b_large")
    assert (small, large) == (1_000, 160_000)
    assert large_peak < small_peak + 4 * 1024 * 1024, (small_peak, large_peak)


@pytest.mark.slow
def test_a_1_gb_result_reads_in_flat_memory(tmp_path: Path) -> None:
    root = str(tmp_path / "storage")
    storage = storage_from_url(root)
    store_batch(storage, "b_small", 1_000, pad=1000)
    store_batch(storage, "b_gb", 1_000_000, pad=1000)  # ~1.05 GB
    _, small_peak = _peak_reading(root, "b_small")
    count, large_peak = _peak_reading(root, "b_gb")
    assert count == 1_000_000
    assert large_peak < small_peak + 4 * 1024 * 1024, (small_peak, large_peak)

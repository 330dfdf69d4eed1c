"""One artifact download against a real HTTP server: exact bytes, resumes, refreshes, refusals."""

from __future__ import annotations

import gzip
import hashlib
import threading
import time
from collections.abc import Callable

import pytest

from receiver.batchrouter import BatchRouterClient
from receiver.errors import (
    ArtifactExpired,
    ArtifactMissing,
    CorruptArtifact,
    DownloadFailed,
    IncompleteDownload,
    JobCancelled,
    StorageUnavailable,
    UnsafeURL,
)
from receiver.jobs.netguard import URLPolicy
from receiver.jobs.transfer import Downloader, TransferResult
from receiver.storage.base import Writer
from tests._httpservers import Artifact, ArtifactServer, Canned, Fault, LiveServer, ScriptedServer

LISTED = URLPolicy(("127.0.0.1",))


def jsonl(lines: int, *, final_newline: bool = True) -> bytes:
    text = "\n".join(f'{{"customer_item_id": "item-{i:06d}", "output": "{"x" * (i % 50)}"}}' for i in range(lines))
    return (text + ("\n" if final_newline else "")).encode()


BODY = jsonl(20_000)  # about 1.3 MB: several 1 MiB blocks with a small block size below


class MemoryWriter(Writer):
    """The in-memory storage writer the tests feed."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.bytes_written = 0
        self.data = bytearray()
        self.committed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data
        self.bytes_written += len(data)

    def commit(self) -> None:
        self.committed = True

    def abort(self) -> None:
        self.aborted = True


class Opener:
    """`open_writer` for a download: records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None]] = []
        self.writers: list[MemoryWriter] = []

    def __call__(self, suffix: str, size: int | None) -> MemoryWriter:
        self.calls.append((suffix, size))
        writer = MemoryWriter("results" + suffix)
        self.writers.append(writer)
        return writer


class UrlSource:
    """`get_url` for a download: a fresh signed URL each call (`?sig=1`, `?sig=2`, ...)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return f"{self.base}?sig={self.calls}"


def downloader(**kwargs) -> Downloader:
    kwargs.setdefault("block_size", 256 * 1024)
    kwargs.setdefault("read_timeout", 5)
    return Downloader(kwargs.pop("policy", LISTED), **kwargs)


def fetch(dl: Downloader, get_url, open_writer, progress=None) -> tuple[MemoryWriter, TransferResult]:
    """As the worker does it: open the download, open a writer for what it answered, stream into
    it, abort the writer on failure."""
    with dl.open(get_url) as download:
        writer = open_writer(download.suffix, download.size)
        try:
            return writer, download.stream_into(writer, progress)
        except BaseException:
            writer.abort()
            raise


def serve(artifacts: dict[str, Artifact], *faults: Fault, ranges: bool = True) -> tuple[ArtifactServer, LiveServer]:
    app = ArtifactServer(artifacts, ranges=ranges)
    app.faults.extend(faults)
    return app, LiveServer(app)


def assert_exact(writer: MemoryWriter, result: TransferResult, body: bytes, lines: int) -> None:
    assert bytes(writer.data) == body
    assert result.bytes == len(body) == writer.bytes_written
    assert result.sha256 == hashlib.sha256(body).hexdigest()
    assert result.lines == lines
    assert not writer.committed and not writer.aborted  # the caller commits


def no_authorization(app: ArtifactServer) -> None:
    assert app.seen, "the artifact server saw no request"
    for seen in app.seen:
        assert "Authorization" not in seen.headers
        assert not any("br_live" in value for value in seen.headers.values())


# --- exact bytes -----------------------------------------------------------------------------------


def test_plain_artifact_is_stored_exactly_with_hash_and_lines() -> None:
    app, server = serve({"/results.jsonl": Artifact(BODY)})
    opener = Opener()
    sizes: list[int] = []
    with server:
        writer, result = fetch(
            downloader(), UrlSource(server.url + "/results.jsonl"), opener, lambda done, total: sizes.append(done)
        )
    assert_exact(writer, result, BODY, 20_000)
    assert result.suffix == ".jsonl"
    assert opener.calls == [(".jsonl", len(BODY))]
    assert sizes[-1] == len(BODY) and sizes == sorted(sizes)
    no_authorization(app)
    assert app.seen[0].headers.get("Accept-Encoding") == "identity"


@pytest.mark.parametrize(("body", "lines"), [(jsonl(3, final_newline=False), 3), (b"", 0), (b"\n\n", 2), (b"x", 1)])
def test_line_count_counts_a_last_line_without_newline(body: bytes, lines: int) -> None:
    _, server = serve({"/r.jsonl": Artifact(body)})
    with server:
        writer, result = fetch(downloader(), UrlSource(server.url + "/r.jsonl"), Opener())
    assert_exact(writer, result, body, lines)


def test_gzip_artifact_keeps_compressed_bytes_and_counts_decompressed_lines() -> None:
    text = jsonl(50_000)
    body = gzip.compress(text[:700_000]) + gzip.compress(text[700_000:])  # two gzip members
    app, server = serve({"/results.jsonl.gz": Artifact(body, content_type="application/gzip")})
    opener = Opener()
    with server:
        writer, result = fetch(downloader(block_size=64 * 1024), UrlSource(server.url + "/results.jsonl.gz"), opener)
    assert_exact(writer, result, body, 50_000)
    assert result.suffix == ".jsonl.gz"
    assert opener.calls == [(".jsonl.gz", len(body))]


def test_content_encoding_gzip_is_stored_undecoded_as_jsonl_gz() -> None:
    body = gzip.compress(jsonl(1000))
    _, server = serve({"/results": Artifact(body, content_type="application/x-ndjson", content_encoding="gzip")})
    with server:
        writer, result = fetch(downloader(), UrlSource(server.url + "/results"), Opener())
    assert_exact(writer, result, body, 1000)
    assert result.suffix == ".jsonl.gz"


def test_gzip_artifact_that_does_not_decompress_fails_and_aborts() -> None:
    _, server = serve({"/r.jsonl.gz": Artifact(b"\x1f\x8b\x08\x00garbage-not-deflate" * 100)})
    opener = Opener()
    with server, pytest.raises(CorruptArtifact):
        fetch(downloader(), UrlSource(server.url + "/r.jsonl.gz"), opener)
    assert opener.writers[0].aborted


# --- resumes ---------------------------------------------------------------------------------------


def test_dropped_connection_resumes_with_range() -> None:
    app, server = serve({"/results.jsonl": Artifact(BODY)}, Fault("drop", after=300_000))
    opener = Opener()
    with server:
        writer, result = fetch(downloader(), UrlSource(server.url + "/results.jsonl"), opener)
    assert_exact(writer, result, BODY, 20_000)
    assert len(opener.calls) == 1  # one writer, fed across both responses
    assert [s.headers.get("Range") for s in app.seen] == [None, "bytes=300000-"]
    no_authorization(app)


def test_host_without_range_support_resends_and_the_prefix_is_discarded() -> None:
    app, server = serve({"/results.jsonl": Artifact(BODY)}, Fault("drop", after=300_000), ranges=False)
    with server:
        writer, result = fetch(downloader(), UrlSource(server.url + "/results.jsonl"), Opener())
    assert_exact(writer, result, BODY, 20_000)
    assert app.seen[1].headers.get("Range") == "bytes=300000-"


def test_gzip_resume_continues_the_line_count() -> None:
    body = gzip.compress(jsonl(30_000))
    _, server = serve({"/r.jsonl.gz": Artifact(body)}, Fault("drop", after=len(body) // 3), Fault("no-range"))
    with server:
        writer, result = fetch(downloader(block_size=32 * 1024), UrlSource(server.url + "/r.jsonl.gz"), Opener())
    assert_exact(writer, result, body, 30_000)


def test_stalled_host_hits_the_read_timeout_then_resumes() -> None:
    app, server = serve({"/results.jsonl": Artifact(BODY)}, Fault("stall", after=600_000, seconds=4))
    started = time.monotonic()
    with server:
        writer, result = fetch(downloader(read_timeout=0.5), UrlSource(server.url + "/results.jsonl"), Opener())
    assert time.monotonic() - started < 3
    assert_exact(writer, result, BODY, 20_000)
    # Two whole 256 KiB blocks reached the writer before the stall; the partial third is fetched again.
    assert app.seen[1].headers.get("Range") == f"bytes={2 * 256 * 1024}-"


def cancel_when(download_of: list, ready: Callable[[], bool]) -> threading.Thread:
    """A thread that cancels the download (once it exists and `ready()`), as SIGTERM does."""

    def run() -> None:
        while not (download_of and ready()):
            time.sleep(0.01)
        download_of[0].cancel()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def fetch_until_cancelled(dl: Downloader, url: str, ready: Callable[[], bool], progress=None) -> MemoryWriter:
    """`fetch`, with the download cancelled from another thread once `ready()`; returns the writer."""
    opened: list = []
    canceller = cancel_when(opened, ready)
    with dl.open(lambda: url) as download:
        opened.append(download)
        writer = MemoryWriter("results.jsonl")
        with pytest.raises(JobCancelled):
            download.stream_into(writer, progress)
    canceller.join()
    return writer


def test_cancel_cuts_short_a_read_blocked_on_a_stalled_host() -> None:
    # The stall (20 s) is shorter than the read timeout (30 s): cancelled while the host still
    # stalls means cancelled before the read could have timed out.
    app, server = serve({"/results.jsonl": Artifact(BODY)}, Fault("stall", after=2 * 64 * 1024, seconds=20))
    received: list[int] = []
    with server:
        writer = fetch_until_cancelled(
            downloader(block_size=64 * 1024, read_timeout=30),
            server.url + "/results.jsonl",
            lambda: received[-1:] == [2 * 64 * 1024],  # every byte before the stall is in
            lambda done, _size: received.append(done),
        )
        assert not app.stall_over.is_set()
    assert len(app.seen) == 1  # no resume after a cancel
    assert writer.bytes_written <= 2 * 64 * 1024


def test_cancel_ends_a_resume_pause_without_another_request() -> None:
    # The resume after a drop is answered 429 with a 30 s Retry-After; a cancel in that pause
    # ends the download instead of waiting it out and asking again.
    faults = [Fault("drop", after=1000), Fault("status", status=429, headers={"Retry-After": "30"})]
    app, server = serve({"/results.jsonl": Artifact(BODY)}, *faults)
    with server:
        fetch_until_cancelled(downloader(), server.url + "/results.jsonl", lambda: len(app.seen) == 2)
        assert len(app.seen) == 2


def test_short_body_never_succeeds_and_the_writer_is_aborted() -> None:
    faults = [Fault("drop", after=1000) for _ in range(3)]
    app, server = serve({"/results.jsonl": Artifact(BODY)}, *faults)
    opener = Opener()
    with server, pytest.raises(IncompleteDownload) as caught:
        fetch(downloader(max_resumes=2), UrlSource(server.url + "/results.jsonl"), opener)
    assert caught.value.transient
    assert len(app.seen) == 3
    assert opener.writers[0].aborted and not opener.writers[0].committed
    assert "sig=" not in str(caught.value)


def test_server_errors_are_retried_honouring_retry_after() -> None:
    app, server = serve(
        {"/results.jsonl": Artifact(BODY)},
        Fault("status", status=503, headers={"Retry-After": "1"}),
        Fault("status", status=429),
    )
    started = time.monotonic()
    with server:
        writer, result = fetch(downloader(), UrlSource(server.url + "/results.jsonl"), Opener())
    assert time.monotonic() - started >= 1.0
    assert_exact(writer, result, BODY, 20_000)
    assert len(app.seen) == 3


def test_persistent_server_errors_raise_download_failed() -> None:
    faults = [Fault("status", status=500) for _ in range(3)]
    _, server = serve({"/results.jsonl": Artifact(BODY)}, *faults)
    opener = Opener()
    with server, pytest.raises(DownloadFailed) as caught:
        fetch(downloader(max_resumes=2), UrlSource(server.url + "/results.jsonl"), opener)
    assert caught.value.transient
    assert opener.calls == []


# --- signed URL refresh, missing artifact ------------------------------------------------------------


def test_403_asks_for_a_fresh_url() -> None:
    app, server = serve({"/results.jsonl": Artifact(BODY)}, Fault("status", status=403))
    source = UrlSource(server.url + "/results.jsonl")
    with server:
        writer, result = fetch(downloader(), source, Opener())
    assert_exact(writer, result, BODY, 20_000)
    assert source.calls == 2
    assert [s.raw_uri for s in app.seen] == ["/results.jsonl?sig=1", "/results.jsonl?sig=2"]


def test_expired_url_mid_download_refreshes_and_resumes() -> None:
    app, server = serve({"/results.jsonl": Artifact(BODY)}, Fault("drop", after=200_000), Fault("status", status=403))
    source = UrlSource(server.url + "/results.jsonl")
    with server:
        writer, result = fetch(downloader(), source, Opener())
    assert_exact(writer, result, BODY, 20_000)
    assert source.calls == 2
    assert app.seen[-1].raw_uri.endswith("sig=2") and app.seen[-1].headers.get("Range") == "bytes=200000-"


def test_url_that_stays_expired_raises_artifact_expired() -> None:
    faults = [Fault("status", status=status) for status in (403, 401, 410, 403)]
    _, server = serve({"/results.jsonl": Artifact(BODY)}, *faults)
    source = UrlSource(server.url + "/results.jsonl")
    with server, pytest.raises(ArtifactExpired):
        fetch(downloader(max_refreshes=3), source, Opener())
    assert source.calls == 4


def test_404_raises_artifact_missing() -> None:
    _, server = serve({})
    opener = Opener()
    with server, pytest.raises(ArtifactMissing):
        fetch(downloader(), UrlSource(server.url + "/gone.jsonl"), opener)
    assert opener.calls == []


# --- policy ----------------------------------------------------------------------------------------


def test_unlisted_host_is_refused_before_connecting() -> None:
    app, server = serve({"/results.jsonl": Artifact(BODY)})
    with server:
        with pytest.raises(UnsafeURL):
            fetch(downloader(policy=URLPolicy(())), UrlSource(server.url + "/results.jsonl"), Opener())
        with pytest.raises(UnsafeURL):
            fetch(downloader(), UrlSource(f"http://localhost:{server.port}/results.jsonl"), Opener())
    assert app.seen == []


@pytest.mark.parametrize(
    "location",
    ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.2:{port}/results.jsonl", "http://localhost:{port}/x"],
)
def test_redirect_to_an_unsafe_place_is_refused(location: str) -> None:
    app, server = serve({"/results.jsonl": Artifact(BODY)})
    with server:
        app.faults.append(Fault("redirect", status=302, location=location.format(port=server.port)))
        with pytest.raises(UnsafeURL):
            fetch(downloader(), UrlSource(server.url + "/results.jsonl"), Opener())
    assert len(app.seen) == 1


def test_redirect_to_an_allowed_url_is_followed_and_limited() -> None:
    app, server = serve({"/final.jsonl": Artifact(BODY)}, Fault("redirect", status=307, location="/final.jsonl"))
    with server:
        writer, result = fetch(downloader(), UrlSource(server.url + "/results.jsonl"), Opener())
        assert_exact(writer, result, BODY, 20_000)
        app.faults.extend(Fault("redirect", status=302, location="/again") for _ in range(6))
        with pytest.raises(DownloadFailed, match="redirected more than 5"):
            fetch(downloader(), UrlSource(server.url + "/results.jsonl"), Opener())


# --- the API key never reaches an artifact host -----------------------------------------------------


def test_artifact_on_the_api_host_never_gets_the_api_key() -> None:
    """The key goes with API calls, never by host, never with an artifact download (docs/batchrouter-api.md,
    "Base URL and authentication")."""
    api = ScriptedServer()
    artifacts = ArtifactServer({"/files/results.jsonl": Artifact(BODY)})
    artifacts.faults.append(Fault("drop", after=100_000))

    def app(environ, start_response):
        target = api if environ["PATH_INFO"].startswith("/v1/") else artifacts
        return target(environ, start_response)

    with LiveServer(app) as server:
        api.on(
            "GET",
            "/v1/batches/bat_1/artifact-url",
            Canned(200, {"url": server.url + "/files/results.jsonl?sig=1"}),
        )
        client = BatchRouterClient(server.url, "br_live_topsecret")
        get_url: Callable[[], str] = lambda: client.get_artifact_links("bat_1").results_url  # noqa: E731
        writer, result = fetch(downloader(), get_url, Opener())
        client.close()
    assert_exact(writer, result, BODY, 20_000)
    assert all(s.headers.get("Authorization") == "Bearer br_live_topsecret" for s in api.seen)
    assert len(artifacts.seen) == 2
    no_authorization(artifacts)


def test_an_exception_from_progress_aborts_the_writer() -> None:
    _, server = serve({"/results.jsonl": Artifact(BODY)})
    opener = Opener()

    def progress(done: int, total: int | None) -> None:
        raise RuntimeError("lease lost")

    with server, pytest.raises(RuntimeError, match="lease lost"):
        fetch(downloader(), UrlSource(server.url + "/results.jsonl"), opener, progress)
    assert opener.writers[0].aborted


def test_a_storage_failure_stops_the_download_with_its_own_error() -> None:
    """A write failure (raised on the writer's thread) reaches the caller as the storage error."""

    class FullDisk(MemoryWriter):
        def write(self, data: bytes) -> None:
            if self.bytes_written >= 300_000:
                raise StorageUnavailable("disk full")
            super().write(data)

    writers: list[FullDisk] = []

    def open_writer(suffix: str, size: int | None) -> FullDisk:
        writers.append(FullDisk("results" + suffix))
        return writers[-1]

    app, server = serve({"/results.jsonl": Artifact(BODY)})
    with server, pytest.raises(StorageUnavailable):
        fetch(downloader(block_size=64 * 1024), UrlSource(server.url + "/results.jsonl"), open_writer)
    assert writers[0].aborted
    assert len(app.seen) == 1  # not retried as if the network had failed

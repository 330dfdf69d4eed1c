"""One streaming artifact download into a storage Writer: ranges, hashing, line counts.

The bytes are stored exactly as the artifact host sent them (no content decoding), read in large
blocks straight from the socket, and each block is hashed, counted and handed to the writer once:
no per-line work and no extra copy, because the target is the throughput of ``curl -o`` to the same
disk (docs/benchmarking.md, "Streaming to local storage"). The storage write runs on a thread of its own
(:class:`_Sink`) so that it overlaps with reading, hashing and counting the next block.

Failures along the way are repaired where that is cheap and safe:

- a dropped connection, a read timeout, a short body, a 5xx or a 429 resumes from the bytes the
  writer already holds with ``Range: bytes=N-`` (a host without range support gets its first N bytes
  discarded instead);
- a 401, 403 or 410 asks artifact-url for a fresh signed URL (docs/architecture.md, "Behaviour
  operators rely on");
- a redirect is followed by hand, and only to a URL that passes the policy again.

A download can be stopped from another thread (:meth:`Download.cancel`: SIGTERM, a lost lease): the
socket being read is shut down, so a read blocked on a silent host returns at once instead of after
the read timeout, and no pause or further request follows.

The download never carries an Authorization header: it uses the policy's own connection pool, which
has no default headers, and sends only the headers built here.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import queue
import re
import threading
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

from urllib3 import BaseHTTPResponse, Timeout
from urllib3.exceptions import HTTPError as _Urllib3Error
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from .. import __version__
from ..errors import (
    ArtifactExpired,
    ArtifactMissing,
    DownloadFailed,
    IncompleteDownload,
    JobCancelled,
    TransferError,
)
from ..layout import suffix_for
from ..retry import backoff, parse_retry_after
from ..storage.base import Writer
from .netguard import URLPolicy
from .tally import GzipLineCounter, LineCounter, TransferResult

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
#: Longest `Retry-After` from an artifact host we sleep through inside one fetch, in seconds.
RETRY_AFTER_CAP = 30.0
#: Backoff before a resume when the host gave no `Retry-After`: short, the host usually recovers fast.
_BACKOFF_BASE = 0.25
_BACKOFF_CAP = 4.0

_REDIRECT = frozenset({301, 302, 303, 307, 308})
#: What an expired or revoked signed URL looks like: S3 and GCS answer 403, others 401 or 410.
_EXPIRED = frozenset({401, 403, 410})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


class Downloader:
    """Fetches artifacts under one URL policy. Thread-safe: one instance serves a whole worker."""

    def __init__(
        self,
        policy: URLPolicy,
        *,
        connect_timeout: float = 10,
        read_timeout: float = 60,
        block_size: int = 1 << 20,
        max_resumes: int = 5,
        max_refreshes: int = 3,
    ) -> None:
        self._policy = policy
        self._pool = policy.pool_manager()
        # The read timeout bounds each wait for the next bytes, so a stalled host frees the slot.
        self._timeout = Timeout(connect=connect_timeout, read=read_timeout)
        self._block_size = block_size
        self._max_resumes = max_resumes
        self._max_refreshes = max_refreshes
        self._headers = {"User-Agent": f"batchrouter-receiver/{__version__}", "Accept-Encoding": "identity"}

    def close(self) -> None:
        self._pool.clear()

    def open(self, get_url: Callable[[], str]) -> Download:
        """Request the artifact until its host answers with its first bytes (200 or 206).

        `get_url` is called now and again each time the host says the signed URL expired. What the
        answer says (size, suffix) lets the caller open the right writer before any byte is read;
        :meth:`Download.stream_into` then moves the bytes.
        """
        requests = _Requests(self, get_url)
        return Download(self, requests, requests.next_response(offset=0))

    def _copy(self, response: BaseHTTPResponse, state: _State, skip: int) -> None:
        """Move the body into the writer, block by block; the hot loop of the whole receiver."""
        read = response.read
        feed = state.feed
        amt = self._block_size
        while True:
            block = read(amt)
            if not block:
                return
            if skip:
                # A host without range support resent the bytes we already have: drop them.
                if len(block) <= skip:
                    skip -= len(block)
                    continue
                block = block[skip:]
                skip = 0
            feed(block)

    def _delay(self, failures: int, error: TransferError, retry_after: float | None = None) -> float:
        """How long to wait before the next resume; raises `error` when the resumes are used up."""
        if failures > self._max_resumes:
            raise error
        if retry_after is not None:
            delay = min(retry_after, RETRY_AFTER_CAP)
        else:
            delay = backoff(failures, base=_BACKOFF_BASE, cap=_BACKOFF_CAP)
        log.info("artifact download: %s; resuming in %.1fs (%d/%d)", error, delay, failures, self._max_resumes)
        return delay


class Download:
    """An artifact whose host has answered: its size and suffix are known, its body not yet read.

    The caller opens a writer for :attr:`suffix` and :attr:`size` and hands it to
    :meth:`stream_into`; the writer stays the caller's to commit or abort. Use it as a context
    manager (or call :meth:`close`) so that an answer never streamed gives its connection back.
    """

    def __init__(self, downloader: Downloader, requests: _Requests, response: BaseHTTPResponse) -> None:
        self._downloader = downloader
        self._requests = requests
        self._response: BaseHTTPResponse | None = response
        self.size = _answered_size(response)
        #: ``.jsonl`` or ``.jsonl.gz`` (layout.suffix_for).
        self.suffix = suffix_for(
            urlsplit(requests.url).path, response.headers.get("Content-Type"), response.headers.get("Content-Encoding")
        )
        self.etag = response.headers.get("ETag")

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._response is not None:
            _close(self._response)
            self._response = None

    def cancel(self) -> None:
        """Stop this download from another thread, at once: :meth:`stream_into` raises
        JobCancelled instead of waiting out the read timeout, a pause or another request.

        Safe at any time, before, during or after the download: only the socket of a response
        :meth:`stream_into` is still reading is shut down, never one already given back to the pool.
        """
        self._requests.cancel()

    def stream_into(self, writer: Writer, progress: Callable[[int, int | None], None] | None = None) -> TransferResult:
        """Write the whole artifact into `writer` (uncommitted), resuming where a request broke off.

        `progress(received, size)` is called on the caller's thread after each block (`received`
        may run a few blocks ahead of what the writer has stored); an exception it raises (a lost
        lease, say) stops the download. Whatever this raises, `writer` is left for the caller to
        abort.
        """
        if self._response is None:
            raise RuntimeError("a Download streams once")
        state = _State(writer, progress, self)
        response: BaseHTTPResponse | None = self._response
        self._response = None
        requests = self._requests
        host = urlsplit(requests.url).hostname
        try:
            while True:
                if response is None:
                    response = requests.next_response(offset=state.stored())
                    host = urlsplit(requests.url).hostname
                failure: TransferError | None = None
                try:
                    requests.reading(response)
                    skip = state.begin(response)
                    self._downloader._copy(response, state, skip)
                except _Urllib3Error as exc:  # the body broke off: a drop, a stall, a short body, TLS
                    failure = _body_failure(exc, host, state)
                finally:
                    requests.reading(None)
                    _close(response)
                    response = None
                # A cancel ends the body early (an error, or an end that looks like a clean one).
                requests.raise_if_cancelled()
                if failure is not None:
                    requests.pause(failure)
                    continue
                if state.size is not None and state.received < state.size:
                    requests.pause(IncompleteDownload(f"artifact host {host!r} sent {state.received} of {state.size} bytes"))
                    continue
                return state.result()
        except BaseException:
            state.stop()
            raise


class _Requests:
    """The requests of one download: the current URL, redirects, fresh URLs and resumes so far."""

    def __init__(self, downloader: Downloader, get_url: Callable[[], str]) -> None:
        self._downloader = downloader
        self._get_url = get_url
        self.url = get_url()
        self._refreshes = self._resumes = 0
        self._cancelled = threading.Event()
        # Guards `_reading`, so that a cancel never shuts down a socket the reader has given back.
        self._lock = threading.Lock()
        self._reading: BaseHTTPResponse | None = None

    def cancel(self) -> None:
        """Called from another thread: mark the download cancelled, then unblock its read."""
        self._cancelled.set()
        with self._lock:
            if self._reading is not None:
                _shut_down(self._reading)

    def reading(self, response: BaseHTTPResponse | None) -> None:
        """Note the response whose body is now read (None: done with it, about to close it)."""
        with self._lock:
            self._reading = response
        # A cancel that came before the response was noted found nothing to shut down: it is
        # seen here instead (it sets the flag before it looks).
        if response is not None:
            self.raise_if_cancelled()

    def raise_if_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise JobCancelled("artifact download cancelled")

    def pause(self, error: TransferError, retry_after: float | None = None) -> None:
        self._resumes += 1
        if self._cancelled.wait(self._downloader._delay(self._resumes, error, retry_after)):
            self.raise_if_cancelled()

    def next_response(self, offset: int) -> BaseHTTPResponse:
        """GET the artifact from byte `offset` until a 200 or 206 answers; returns it unread."""
        downloader = self._downloader
        redirects = 0
        while True:
            self.raise_if_cancelled()
            url = self.url
            downloader._policy.check(url)
            host = urlsplit(url).hostname
            headers = dict(downloader._headers)
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                response = downloader._pool.urlopen(
                    "GET", url, headers=headers, timeout=downloader._timeout, preload_content=False, decode_content=False
                )
            except (_Urllib3Error, OSError) as exc:
                self.pause(DownloadFailed(f"cannot reach artifact host {host!r}: {type(exc).__name__}"))
                continue

            status = response.status
            if status in _REDIRECT:
                location = response.headers.get("Location")
                _close(response)
                redirects += 1
                if not location:
                    raise DownloadFailed(f"artifact host {host!r} answered {status} without a Location")
                if redirects > MAX_REDIRECTS:
                    raise DownloadFailed(f"artifact download redirected more than {MAX_REDIRECTS} times")
                self.url = urljoin(url, location)
                continue
            redirects = 0
            if status in _EXPIRED:
                _close(response)
                self._refreshes += 1
                if self._refreshes > downloader._max_refreshes:
                    raise ArtifactExpired(
                        f"artifact host {host!r} answered {status} after {downloader._max_refreshes} fresh URLs"
                    )
                self.url = self._get_url()
                continue
            if status == 404:
                _close(response)
                raise ArtifactMissing(f"artifact host {host!r} answered 404 for the artifact URL")
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                _close(response)
                self.pause(DownloadFailed(f"artifact host {host!r} answered {status}", status=status), retry_after)
                continue
            if status not in (200, 206):
                _close(response)
                raise DownloadFailed(f"artifact host {host!r} answered an unexpected {status}", status=status)
            return response


class _State:
    """Everything one download accumulates across its requests: hash, line count, size."""

    def __init__(self, writer: Writer, progress: Callable[[int, int | None], None] | None, download: Download) -> None:
        self.writer = writer
        self._progress = progress
        self.suffix = download.suffix
        self.size = download.size
        self.etag = download.etag
        #: Bytes taken from the network and handed to the sink (the writer may still be behind).
        self.received = 0
        self._sha256 = hashlib.sha256()
        self._lines: LineCounter = GzipLineCounter() if self.suffix.endswith(".gz") else LineCounter()
        # The line count runs on the sink's thread: bytes.count holds the GIL while the hash and
        # the socket read on this thread do not, so the two threads overlap.
        self._sink = _Sink(writer, before_write=self._lines.feed)
        self._first = True

    def stored(self) -> int:
        """Bytes the writer holds, once it has caught up: where a resumed request starts."""
        self._sink.drain()
        return self.writer.bytes_written

    def begin(self, response: BaseHTTPResponse) -> int:
        """Check a 200/206 against what we hold. Returns how many leading bytes of the body to
        discard (a 200 answering a range request)."""
        if self._first:
            self._first = False
            return 0
        offset = self.stored()
        skip = 0 if response.status == 206 else offset
        size = _answered_size(response, offset)
        etag = response.headers.get("ETag")
        # A resumed request must be for the same object, or the stored bytes would be a splice.
        if (size is not None and self.size is not None and size != self.size) or (etag and self.etag and etag != self.etag):
            raise DownloadFailed("the artifact changed while it was being downloaded")
        if self.size is None:
            self.size = size
        return skip

    def feed(self, block: bytes) -> None:
        if self.size is not None and self.received + len(block) > self.size:
            raise DownloadFailed(f"artifact host sent more than the {self.size} bytes it promised")
        self._sha256.update(block)
        self._sink.put(block)
        self.received += len(block)
        if self._progress is not None:
            self._progress(self.received, self.size)

    def result(self) -> TransferResult:
        self._sink.close()
        written = self.writer.bytes_written
        if written != self.received or (self.size is not None and written != self.size):
            raise IncompleteDownload(f"stored {written} bytes of the {self.size or self.received} promised")
        return TransferResult(bytes=written, sha256=self._sha256.hexdigest(), lines=self._lines.finish(), suffix=self.suffix)

    def stop(self) -> None:
        """Stop the sink and drop what it holds; never raises. The writer is the caller's."""
        self._sink.close(discard=True)


class _Sink:
    """Hands blocks to `writer.write` on a thread of its own, in order, through a short queue.

    Why a thread: per block, reading from the socket, hashing and counting cost about as much as the
    storage write (a copy into the page cache, or into an S3 part buffer), and the write releases the
    GIL. Overlapping the two is what brings a download to ``curl -o`` speed, and counting lines here
    (`before_write`, just before each write) keeps the reading thread from being the bottleneck
    (BENCHMARKS.md, "Streaming to local storage"). The queue holds at most `depth` blocks, so memory
    stays flat however large the artifact.

    All writes happen on this one thread, one at a time; the caller's thread touches the writer only
    after :meth:`drain` or :meth:`close`. A write (or `before_write`) failure is raised in the
    caller's thread.
    """

    def __init__(self, writer: Writer, depth: int = 4, before_write: Callable[[bytes], None] | None = None) -> None:
        self._writer = writer
        self._before_write = before_write
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._discard = False
        self._thread = threading.Thread(target=self._run, name="artifact-writer", daemon=True)
        self._thread.start()

    def put(self, block: bytes) -> None:
        self._raise_error()
        self._queue.put(block)

    def drain(self) -> None:
        """Wait until every block handed over is written; raise the write failure, if any."""
        if self._thread.is_alive():
            self._queue.join()
        self._raise_error()

    def close(self, *, discard: bool = False) -> None:
        """Finish the thread: write what is queued (or drop it, when `discard`), then stop."""
        if self._thread.is_alive():
            self._discard = discard
            self._queue.put(None)
            self._thread.join()
        if not discard:
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        write = self._writer.write
        before = self._before_write
        while True:
            block = self._queue.get()
            try:
                if block is None:
                    return
                if self._error is None and not self._discard:
                    if before is not None:
                        before(block)
                    write(block)
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()


def _body_failure(exc: Exception, host: str | None, state: _State) -> TransferError:
    """Name what broke a body off: a short body (IncompleteDownload) or a host failure (DownloadFailed)."""
    if isinstance(exc, ReadTimeoutError):
        return DownloadFailed(f"artifact host {host!r} stalled past the read timeout")
    if isinstance(exc, ProtocolError) and any(isinstance(arg, http.client.IncompleteRead) for arg in exc.args):
        return IncompleteDownload(f"artifact host {host!r} closed the connection after {state.received} of {state.size} bytes")
    return DownloadFailed(f"artifact download from {host!r} broke off: {type(exc).__name__}: {exc}")


def _answered_size(response: BaseHTTPResponse, offset: int = 0) -> int | None:
    """The whole artifact's size as a 200 (Content-Length) or a 206 (Content-Range) gives it.

    A 206 must start at `offset`, the bytes already held: anything else would splice the file.
    """
    if response.status != 206:
        return _content_length(response)
    match = _CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
    if match is None:
        raise DownloadFailed("artifact host answered 206 without a usable Content-Range")
    start = int(match.group(1))
    if start != offset:
        raise DownloadFailed(f"artifact host resumed at byte {start}, not at byte {offset}")
    return None if match.group(3) == "*" else int(match.group(3))


def _content_length(response: BaseHTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _shut_down(response: BaseHTTPResponse) -> None:
    """Shut down the socket under `response` for reading, so that a read blocked on it returns now.

    urllib3's ``HTTPResponse.shutdown`` (2.3+) is made for this: it reaches the socket even when the
    connection object already let go of it (a ``Connection: close`` answer), and it shuts down
    rather than closes, so the descriptor is not freed under the reader, who closes it itself.
    """
    try:
        response.shutdown()
    except (OSError, ValueError, RuntimeError):  # closed already, or no socket: nothing is blocked on it
        pass


def _close(response: BaseHTTPResponse) -> None:
    """Close a response and give its pool slot back; an unread body (a 403 page, say) is not read."""
    response.close()
    response.release_conn()

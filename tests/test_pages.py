"""Results page by page (receiver/pages.py, `get_results_page`): every documented page form, the
guards against an API that pages for ever, and a file that is never visible before it is whole."""

from __future__ import annotations

import hashlib
import json
import socket
import threading

import pytest

from receiver.batchrouter import BatchRouterClient
from receiver.errors import ArtifactUnavailable, BatchNotFound, IncompleteDownload, UnexpectedResponse
from receiver.jobs.pages import MAX_EMPTY_PAGES, PAGE_LIMIT, write_pages
from receiver.jobs.tally import LineCounter
from receiver.storage.local import LocalStorage
from tests._httpservers import Canned

KEY = "br_live_pages_key"
RESULTS = "/v1/batches/bat_1/results"
KEY_OF_FILE = "results/dt=2026-11-27/batch_id=bat_1/results.jsonl"


@pytest.fixture
def client(api):
    with BatchRouterClient(api.url, KEY, timeout=2, retries=2, backoff_cap=1) as c:
        yield c


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(str(tmp_path / "storage"))


def rows(first: int, count: int) -> list[dict]:
    return [{"customer_item_id": f"item-{i}", "output": {"text": "é"}} for i in range(first, first + count)]


def jsonl(items: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for r in items)


def read_page(client, **query) -> tuple[bytes, int, str | None]:
    """The page's body, its rows (counted as its lines, as write_pages does) and its next cursor."""
    with client.results_page("bat_1", **query) as page:
        counter = LineCounter()
        body = b"".join(page.chunks)
        counter.feed(body)
        return body, counter.finish(), page.next_cursor


def store_pages(client, batch_id, open_writer, progress=None, *, expected_items=None):
    """As the worker does it: open the `.jsonl` writer, page into it, abort it on failure."""
    writer = open_writer(".jsonl", None)
    try:
        return writer, write_pages(client, batch_id, writer, progress, expected_items=expected_items)
    except BaseException:
        writer.abort()
        raise


def store(client, storage):
    def open_writer(suffix: str, size: int | None):
        assert suffix == ".jsonl"
        return storage.open_writer(KEY_OF_FILE, token="t1", size_hint=size)

    return store_pages(client, "bat_1", open_writer)


# --- one page ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "cursor"),
    [
        ({"data": rows(1, 2), "next_cursor": "c2", "has_more": True}, "c2"),
        ({"data": rows(1, 2), "next_cursor": None, "has_more": False}, None),
        ({"results": rows(1, 2), "next": "c2"}, "c2"),
        ({"items": rows(1, 2), "pagination": {"next_cursor": "c2", "has_more": True}}, "c2"),
        ({"rows": rows(1, 2), "meta": {"nextCursor": "c9", "has_more": False}}, None),  # has_more wins
        ({"data": rows(1, 2), "state": "completed", "counts": {"total": 2}}, None),
    ],
)
def test_json_page_forms(api, client, body, cursor) -> None:
    api.on("GET", RESULTS, Canned(200, body))
    assert read_page(client, cursor="c1", limit=10) == (jsonl(rows(1, 2)), 2, cursor)
    assert api.seen[0].raw_uri == f"{RESULTS}?limit=10&cursor=c1"
    assert api.seen[0].headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/jsonl; charset=utf-8", "application/json"])
def test_raw_jsonl_answer_is_the_whole_result_byte_for_byte(api, client, storage, tmp_path, content_type) -> None:
    raw = b'{"customer_item_id": "a"}\n{"customer_item_id": "b"}'  # spacing kept, no final newline
    api.on("GET", RESULTS, Canned(200, raw, {"Content-Type": content_type}))
    assert read_page(client) == (raw, 2, None)
    writer, result = store(client, storage)
    writer.commit()
    assert (tmp_path / "storage" / KEY_OF_FILE).read_bytes() == raw
    assert (result.lines, result.bytes, result.sha256) == (2, len(raw), hashlib.sha256(raw).hexdigest())


def test_large_raw_jsonl_is_streamed_not_held(api, client, storage) -> None:
    raw = b"".join(b'{"customer_item_id": "item-%08d", "pad": "%s"}\n' % (i, b"x" * 200) for i in range(200_000))
    api.on("GET", RESULTS, Canned(200, raw, {"Content-Type": "application/x-ndjson"}))
    sizes: list[int] = []

    def open_writer(suffix: str, size: int | None):
        return storage.open_writer(KEY_OF_FILE, token="t1", size_hint=size)

    writer, result = store_pages(client, "bat_1", open_writer, lambda done, total: sizes.append(done))
    writer.abort()
    assert (result.lines, result.bytes) == (200_000, len(raw))
    assert len(sizes) >= len(raw) // (1 << 20)  # written block by block as it arrived


def test_a_json_page_over_the_limit_is_refused(api, client, monkeypatch) -> None:
    monkeypatch.setattr("receiver.batchrouter.answers.MAX_PAGE_BYTES", 1000)
    api.on("GET", RESULTS, Canned(200, {"data": rows(1, 50)}))
    with pytest.raises(UnexpectedResponse, match="not JSONL by its Content-Type"):
        read_page(client)


def test_rows_given_as_lines_are_kept_as_lines(api, client) -> None:
    api.on("GET", RESULTS, Canned(200, {"data": ['{"a": 1}\n', '{"b": 2}']}))
    assert read_page(client)[0] == b'{"a": 1}\n{"b": 2}\n'


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"state": "completed", "output_preview_rows": rows(1, 2)}, "no rows"),
        ({"data": rows(1, 2), "has_more": True}, "no next cursor"),
        ([rows(1, 2)], "not a JSON object"),
        ({"data": ["one\ntwo"]}, "line break"),
    ],
)
def test_pages_we_cannot_trust_are_refused(api, client, body, reason) -> None:
    api.on("GET", RESULTS, Canned(200, body))
    with pytest.raises(UnexpectedResponse, match=reason):
        read_page(client)


@pytest.mark.parametrize("status", [404, 405, 410, 501])
def test_artifact_url_without_a_download_is_artifact_unavailable(api, client, status) -> None:
    api.on("GET", "/v1/batches/bat_1/artifact-url", Canned(status, {"error": {"code": "not_found", "message": "no artifact"}}))
    with pytest.raises(ArtifactUnavailable) as caught:
        client.get_artifact_links("bat_1")
    assert caught.value.status == status and not caught.value.transient


# --- the whole result -------------------------------------------------------------------------------


def test_pages_are_stored_in_order_and_only_whole(api, client, storage, tmp_path) -> None:
    api.on(
        "GET",
        RESULTS,
        Canned(200, {"data": rows(1, 3), "next_cursor": "p2", "has_more": True}),
        Canned(200, {"data": [], "next_cursor": "p3", "has_more": True}),  # an empty page that says more
        Canned(200, {"data": rows(4, 2), "next_cursor": None, "has_more": False}),
    )
    writer, result = store(client, storage)
    final = tmp_path / "storage" / KEY_OF_FILE
    assert not final.exists()  # uncommitted: the caller commits after its own checks
    writer.commit()
    data = final.read_bytes()
    assert data == jsonl(rows(1, 5))
    assert (result.bytes, result.sha256, result.lines, result.suffix) == (
        len(data),
        hashlib.sha256(data).hexdigest(),
        5,
        ".jsonl",
    )
    assert [s.raw_uri for s in api.seen] == [
        f"{RESULTS}?limit={PAGE_LIMIT}",
        f"{RESULTS}?limit={PAGE_LIMIT}&cursor=p2",
        f"{RESULTS}?limit={PAGE_LIMIT}&cursor=p3",
    ]


def test_a_refused_page_size_is_asked_again_without_it(api, client, storage) -> None:
    api.on(
        "GET",
        RESULTS,
        Canned(400, {"error": {"code": "invalid_request", "message": "Invalid limit.", "details": {"limit": "1-100"}}}),
        Canned(200, {"data": rows(1, 1), "next_cursor": "p2"}),
        Canned(200, {"data": rows(2, 1)}),
    )
    writer, result = store(client, storage)
    writer.abort()
    assert result.lines == 2
    assert [s.raw_uri for s in api.seen] == [f"{RESULTS}?limit={PAGE_LIMIT}", RESULTS, f"{RESULTS}?cursor=p2"]


def test_a_cursor_that_comes_back_stops_the_paging_and_leaves_nothing(api, client, storage, tmp_path) -> None:
    api.on(
        "GET",
        RESULTS,
        Canned(200, {"data": rows(1, 1), "next_cursor": "p2"}),
        Canned(200, {"data": rows(2, 1), "next_cursor": "p3"}),
        Canned(200, {"data": rows(3, 1), "next_cursor": "p2"}),
    )
    with pytest.raises(UnexpectedResponse, match="came back"):
        store(client, storage)
    assert [p for p in (tmp_path / "storage").rglob("*") if p.is_file()] == []


def test_a_batch_that_vanished_meanwhile_is_not_found(api, client, storage, tmp_path) -> None:
    api.on("GET", RESULTS, Canned(404, {"error": {"code": "not_found", "message": "No batch."}}))
    with pytest.raises(BatchNotFound):
        store(client, storage)
    assert [p for p in (tmp_path / "storage").rglob("*") if p.is_file()] == []


def test_a_transient_failure_mid_paging_is_retried_in_place(api, client, storage) -> None:
    api.on(
        "GET",
        RESULTS,
        Canned(200, {"data": rows(1, 2), "next_cursor": "p2"}),
        Canned(503, {"error": {"code": "service_unavailable", "message": "try again"}}),
        Canned(200, {"data": rows(3, 2)}),
    )
    writer, result = store(client, storage)
    writer.abort()
    assert result.lines == 4 and result.bytes == len(jsonl(rows(1, 4)))
    assert [s.raw_uri for s in api.seen][1:] == [f"{RESULTS}?limit={PAGE_LIMIT}&cursor=p2"] * 2


def test_empty_pages_without_end_stop_the_paging(api, client, storage) -> None:
    api.on("GET", RESULTS, *[Canned(200, {"data": [], "next_cursor": f"p{i}"}) for i in range(2, 40)])
    with pytest.raises(UnexpectedResponse, match="empty pages in a row"):
        store(client, storage)
    assert len(api.seen) == MAX_EMPTY_PAGES + 1


# --- raw JSONL delimited only by the connection's close ----------------------------------------------


class _CloseDelimited:
    """An API that answers every request with raw JSONL and no framing: no Content-Length, not
    chunked, the end of the body being the connection's close (HTTP/1.1 allows it)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n" + self.body)

    def close(self) -> None:
        self._sock.close()


@pytest.mark.parametrize(
    ("body", "expected_items", "kept"),
    [
        (b'{"a":1}\n{"a":2}\n', 2, True),
        (b'{"a":1}\n{"a":2}\n', 3, False),  # lines the batch counts never arrived
        (b'{"a":1}\n{"a":2}\n', None, True),
        (b'{"a":1}\n{"a', None, False),  # cut mid-line
    ],
)
def test_unframed_raw_jsonl_is_kept_only_when_it_checks_out(storage, body, expected_items, kept) -> None:
    server = _CloseDelimited(body)
    try:
        with BatchRouterClient(server.url, KEY, timeout=2, retries=1) as client:
            with client.results_page("bat_1") as page:
                assert not page.framed

            def open_writer(suffix: str, size: int | None):
                return storage.open_writer(KEY_OF_FILE, token="t1", size_hint=size)

            if kept:
                writer, result = store_pages(client, "bat_1", open_writer, expected_items=expected_items)
                writer.abort()
                assert result.bytes == len(body)
            else:
                with pytest.raises(IncompleteDownload, match="no length to check them by"):
                    store_pages(client, "bat_1", open_writer, expected_items=expected_items)
    finally:
        server.close()

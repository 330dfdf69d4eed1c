"""Results page by page (receiver/pages.py, `get_results_page`): every documented page form, the
guards against an API that pages for ever, and a file that is never visible before it is whole."""

from __future__ import annotations

import hashlib
import json

import pytest

from receiver.client import BatchRouterClient, ResultsPage
from receiver.errors import ArtifactUnavailable, BatchNotFound, UnexpectedResponse
from receiver.pages import MAX_EMPTY_PAGES, PAGE_LIMIT, store_pages
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
    page = client.get_results_page("bat_1", cursor="c1", limit=10)
    assert page == ResultsPage(body=jsonl(rows(1, 2)), rows=2, next_cursor=cursor)
    assert api.seen[0].raw_uri == f"{RESULTS}?limit=10&cursor=c1"
    assert api.seen[0].headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/jsonl; charset=utf-8", "application/json"])
def test_raw_jsonl_answer_is_the_whole_result_byte_for_byte(api, client, content_type) -> None:
    raw = b'{"customer_item_id": "a"}\n{"customer_item_id": "b"}'  # spacing kept, no final newline
    api.on("GET", RESULTS, Canned(200, raw, {"Content-Type": content_type}))
    assert client.get_results_page("bat_1") == ResultsPage(body=raw, rows=2, next_cursor=None)


def test_rows_given_as_lines_are_kept_as_lines(api, client) -> None:
    api.on("GET", RESULTS, Canned(200, {"data": ['{"a": 1}\n', '{"b": 2}']}))
    assert client.get_results_page("bat_1").body == b'{"a": 1}\n{"b": 2}\n'


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
        client.get_results_page("bat_1")


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
    assert (result.bytes, result.sha256, result.lines, result.suffix) == (len(data), hashlib.sha256(data).hexdigest(), 5, ".jsonl")
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

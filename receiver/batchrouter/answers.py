"""What the BatchRouter API answers, read into typed records, tolerating the documented variants.

The sources disagree on shapes (docs/batchrouter-api.md, "Batch status", "Full results:
artifact-url", "Results pages"): ``status`` or ``state``, a ``{"batch": ...}`` wrapper or none,
``cancelled`` or ``canceled``, several names for the download URL, cursors and rows. Every form is
accepted here, so the client and the worker see one shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from urllib3.exceptions import HTTPError as _Urllib3Error

from ..batch_status import TERMINAL_STATUSES
from ..errors import APIError, UnexpectedResponse


@dataclass(frozen=True)
class Batch:
    """A batch as `GET /v1/batches/{id}` returned it, with the variants settled."""

    id: str
    #: As BatchRouter spelled it (e.g. ``canceled``): the manifest records it verbatim.
    status: str
    terminal: bool
    completed: bool
    #: From ``item_count``, ``counts.total``, ``counts.items_total`` or ``items_total``, when given.
    expected_items: int | None
    #: The batch object as returned, unwrapped from ``{"batch": ...}``.
    raw: dict[str, Any]


@dataclass(frozen=True)
class ResultsPage:
    """One page of `GET /v1/batches/{id}/results`, as JSONL text."""

    #: The page's rows, one JSON document per line, each line ending in a newline; or, for an
    #: answer that was raw JSONL, its exact bytes, streamed in blocks (it may be the whole result).
    #: Either way one line per row, so its rows are counted as its lines.
    chunks: Iterable[bytes]
    #: Where the next page starts; None on the last page.
    next_cursor: str | None
    #: False for raw JSONL that came with neither a Content-Length nor chunked framing: a body cut
    #: short then looks whole, so the caller must check it some other way.
    framed: bool = True


@dataclass(frozen=True)
class ArtifactLinks:
    """The signed download links from `GET /v1/batches/{id}/artifact-url`."""

    results_url: str
    errors_url: str | None
    expires_at: str | None


def json_object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise UnexpectedResponse(f"{what}: the answer is not a JSON object")
    return body


def parse_batch(body: Any, requested_id: str) -> Batch:
    """Settle the variants of a batch object (docs/batchrouter-api.md, "Batch status"): wrapper, ``status``/``state``, spelling."""
    if not isinstance(body, dict):
        raise UnexpectedResponse(f"batch {requested_id}: the answer is not a JSON object")
    raw = body["batch"] if isinstance(body.get("batch"), dict) else body
    status = raw.get("status") or raw.get("state")
    if not isinstance(status, str) or not status.strip():
        raise UnexpectedResponse(f"batch {requested_id}: the answer has no status")
    batch_id = raw.get("id")
    lowered = status.strip().lower()
    return Batch(
        id=batch_id if isinstance(batch_id, str) and batch_id else requested_id,
        status=status,
        terminal=lowered in TERMINAL_STATUSES,
        completed=lowered == "completed",
        expected_items=_expected_items(raw),
        raw=raw,
    )


def _expected_items(raw: dict[str, Any]) -> int | None:
    """The batch's item count, from the first of the documented and observed fields that is given.

    ``item_count`` is documented (docs.batchrouter.com/guides/results/); ``counts.total`` is what the
    operator's tooling reads (docs/batchrouter-api.md, "Batch status"; S6); ``items_total`` is the older webhook docs' name (S4).
    """
    found = raw.get("counts")
    counts: dict[str, Any] = found if isinstance(found, dict) else {}
    for value in (raw.get("item_count"), counts.get("total"), counts.get("items_total"), raw.get("items_total")):
        number = _count(value)
        if number is not None:
            return number
    return None


def _count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


_URL_KEYS = ("url", "download_url", "artifact_url", "signed_url")
_ERRORS_URL_KEYS = ("error_file_url", "errors_url", "error_url", "exceptions_url")


def parse_artifact_links(body: Any, batch_id: str) -> ArtifactLinks:
    """Find the links in any of the plausible shapes: flat, ``{"artifact": {...}}`` or ``{"data": {...}}``.

    The artifact-url response is not documented (docs/batchrouter-api.md, "Full results: artifact-url" and "Open questions"); the error file's name comes from
    the older delivery payloads (``error_file_url``, S4) and the console's "exception file" wording (S3).
    """
    if not isinstance(body, dict):
        raise UnexpectedResponse(f"artifact-url for batch {batch_id}: the answer is not a JSON object")
    containers = [body] + [body[k] for k in ("artifact", "data") if isinstance(body.get(k), dict)]
    for container in containers:
        results_url = _first_string(container, _URL_KEYS)
        if results_url is not None:
            errors_url = _first_string(container, _ERRORS_URL_KEYS) or _first_string(body, _ERRORS_URL_KEYS)
            expires_at = _first_string(container, ("expires_at",)) or _first_string(body, ("expires_at",))
            return ArtifactLinks(results_url=results_url, errors_url=errors_url, expires_at=expires_at)
    raise UnexpectedResponse(f"artifact-url for batch {batch_id}: the answer has no download URL")


#: Statuses of artifact-url that mean "no download for this batch" rather than "no such batch":
#: the batch itself was just read. 501 and 405: an API without the endpoint.
NO_ARTIFACT = frozenset({404, 405, 410, 501})
_ROW_KEYS = ("data", "results", "items", "rows")
_CURSOR_KEYS = ("next_cursor", "nextCursor", "next")
#: The most a JSON results page may hold: it is parsed whole. A page of 1,000 rows is far smaller.
MAX_PAGE_BYTES = 32 << 20
_JSONL_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"})


def read_results_page(response: Any, batch_id: str, broken: Callable[[BaseException], APIError]) -> ResultsPage:
    """Read a results page in either form (see `BatchRouterClient.results_page`).

    A JSON page is read whole, up to MAX_PAGE_BYTES; raw JSONL, by its media type, is streamed
    (`broken` names a read that fails half-way). A body that is not one JSON document is JSONL sent
    without its media type: kept as it came, since it is already in memory.
    """
    what = f"results page of batch {batch_id}"
    mimetype = (response.headers.get("Content-Type") or "").partition(";")[0].strip().lower()
    if mimetype in _JSONL_TYPES:
        # urllib3 raises on a body shorter than its Content-Length, or on a chunked body that ends
        # without its last chunk; a body delimited by the connection's close has no such check.
        framed = "Content-Length" in response.headers or "chunked" in response.headers.get("Transfer-Encoding", "").lower()
        return ResultsPage(chunks=_stream(response, broken), next_cursor=None, framed=framed)
    try:
        data: bytes = response.read(MAX_PAGE_BYTES + 1)
    except (_Urllib3Error, OSError) as exc:
        raise broken(exc) from None
    if len(data) > MAX_PAGE_BYTES:
        raise UnexpectedResponse(f"{what}: over {MAX_PAGE_BYTES >> 20} MiB and not JSONL by its Content-Type ({mimetype!r})")
    try:
        body: Any = json.loads(data) if data.strip() else {}
    except ValueError:  # several JSON documents: JSONL sent without its media type
        return ResultsPage(chunks=[data], next_cursor=None)
    if not isinstance(body, dict):
        raise UnexpectedResponse(f"{what}: the answer is not a JSON object")
    rows = next((body[k] for k in _ROW_KEYS if isinstance(body.get(k), list)), None)
    if rows is None:
        # `output_preview_rows` (docs/batchrouter-api.md, "Results pages", S6) is a preview: storing it as the result would store a
        # partial file under a final name.
        raise UnexpectedResponse(f"{what}: no rows under any of {', '.join(_ROW_KEYS)}")
    holders = [body] + [body[k] for k in ("pagination", "meta", "page") if isinstance(body.get(k), dict)]
    cursor = next((c for h in holders if (c := _first_string(h, _CURSOR_KEYS)) is not None), None)
    has_more = next((h["has_more"] for h in holders if isinstance(h.get("has_more"), bool)), None)
    if has_more is False:
        cursor = None
    elif has_more and cursor is None:
        raise UnexpectedResponse(f"{what}: has_more is true but there is no next cursor")
    return ResultsPage(chunks=[b"".join(_jsonl_line(row) for row in rows)], next_cursor=cursor)


def _stream(response: Any, broken: Callable[[BaseException], APIError]) -> Iterator[bytes]:
    try:
        yield from response.stream(1 << 20)
    except (_Urllib3Error, OSError) as exc:
        raise broken(exc) from None


def _jsonl_line(row: Any) -> bytes:
    """A row as one JSONL line: a JSON value compactly, a string (a line already) as itself."""
    if isinstance(row, str):
        line = row.rstrip("\r\n")
        if "\n" in line:
            raise UnexpectedResponse("a results row given as a string holds a line break")
        return line.encode("utf-8") + b"\n"
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _first_string(container: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = container.get(key)
        if isinstance(value, str) and value:
            return value
    return None

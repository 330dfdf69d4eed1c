"""Every call the receiver makes to the BatchRouter API.

One place owns the base URL, the bearer key, timeouts, the retry policy and the error envelope, and
it tolerates the variants the sources disagree on (docs/batchrouter-api.md: "Batch status", "Full results: artifact-url", "Errors, retries and Retry-After"):
``status`` or ``state``, a ``{"batch": ...}`` wrapper or none, ``cancelled`` or ``canceled``.

The key is attached here, to requests for ``api_url`` only, through this client's own connection
pool. Nothing else (least of all an artifact download, which may be on the API's own host) ever
sees it, and redirects are not followed, so it cannot be carried to another host.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
from urllib3.exceptions import HTTPError as _Urllib3Error

from . import __version__
from .batch_status import TERMINAL_STATUSES
from .errors import (
    APIError,
    APITransientError,
    ArtifactUnavailable,
    AuthenticationFailed,
    BadRequest,
    BatchNotFound,
    Conflict,
    InsufficientCredits,
    PermissionDenied,
    RateLimited,
    UnexpectedResponse,
)
from .retry import backoff, parse_retry_after

#: Named exceptions by status, from the error table at docs.batchrouter.com/reference/errors/ (docs/batchrouter-api.md, "Errors, retries and Retry-After").
_ERRORS_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: AuthenticationFailed,
    402: InsufficientCredits,
    403: PermissionDenied,
    404: BatchNotFound,
    409: Conflict,
    429: RateLimited,
}

#: First retry delay, in seconds; it doubles per attempt up to `backoff_cap`, with jitter.
_BACKOFF_BASE = 0.5


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


class BatchRouterClient:
    """A small, thread-safe client for the endpoints the receiver uses.

    `retries` is the number of attempts (first try included) for idempotent requests on a 429, a 5xx,
    a timeout or a dropped connection. Waits follow `Retry-After` when BatchRouter sends it, else
    capped exponential backoff with jitter (docs.batchrouter.com/reference/errors/: "Honour
    Retry-After when present; otherwise exponential backoff with jitter"). A `Retry-After` longer
    than `backoff_cap` is raised at once as RateLimited, so the worker reschedules the job rather
    than block a download slot.
    """

    def __init__(
        self,
        api_url: str,
        api_key: str,
        *,
        timeout: float = 15,
        retries: int = 3,
        backoff_cap: float = 30.0,
        user_agent: str = f"batchrouter-receiver/{__version__}",
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._api_key = api_key
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self._retries = max(1, retries)
        self._backoff_cap = backoff_cap
        self._user_agent = user_agent
        # Our own pool: a bare PoolManager has no default headers and reads no proxy settings.
        self._pool = urllib3.PoolManager(num_pools=4, maxsize=8)

    @classmethod
    def from_settings(cls, settings: Any) -> BatchRouterClient:
        return cls(settings.api_url, settings.require_api_key())

    def __enter__(self) -> BatchRouterClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.clear()

    # --- endpoints --------------------------------------------------------------------------------

    def get_account(self) -> dict[str, Any]:
        """`GET /v1/auth/account`: the account, including ``credit_balance`` (docs/batchrouter-api.md, "Base URL and authentication")."""
        return _object(self._request("GET", "/v1/auth/account"), "account")

    def get_batch(self, batch_id: str) -> Batch:
        """`GET /v1/batches/{id}`: the authoritative status of a batch (docs/batchrouter-api.md, "Batch status")."""
        body = self._request("GET", f"/v1/batches/{_segment(batch_id)}")
        return _parse_batch(body, batch_id)

    def get_artifact_links(self, batch_id: str) -> ArtifactLinks:
        """`GET /v1/batches/{id}/artifact-url`: fresh signed links (docs/batchrouter-api.md, "Full results: artifact-url").

        The response fields are undocumented, so every plausible spelling is accepted.
        """
        try:
            body = self._request("GET", f"/v1/batches/{_segment(batch_id)}/artifact-url")
        except APIError as exc:
            if exc.status in _NO_ARTIFACT:
                raise ArtifactUnavailable(str(exc), status=exc.status, code=exc.code, details=exc.details) from None
            raise
        return _parse_artifact_links(body, batch_id)

    @contextmanager
    def results_page(self, batch_id: str, *, cursor: str | None = None, limit: int | None = None) -> Iterator[ResultsPage]:
        """`GET /v1/batches/{id}/results?limit=&cursor=`: one page of per-item results (docs/batchrouter-api.md, "Results pages").

        Neither the page's fields nor its form are documented, so both forms seen are read: a JSON
        page (rows under ``data``, ``results``, ``items`` or ``rows``; the next cursor as
        ``next_cursor``, ``next`` or inside ``pagination``/``meta``, with or without ``has_more``)
        and raw JSONL (the older SDK's form), which is the whole result. Raw JSONL is streamed, so
        a whole result never sits in memory; read the page's chunks inside the ``with``.
        """
        query = {k: v for k, v in (("limit", limit), ("cursor", cursor)) if v is not None}
        path = f"/v1/batches/{_segment(batch_id)}/results" + ("?" + urlencode(query) if query else "")
        response = self._send("GET", path, stream=True)
        try:
            yield _read_results_page(response, batch_id, lambda exc: self._transport_error("GET", path, exc))
        except BaseException:
            response.close()  # the rest of the body may be unread: this connection is not reusable
            raise
        else:
            response.release_conn()

    def set_delivery_webhook(self, url: str, secret: str) -> dict[str, Any]:
        """`PUT /v1/auth/account/delivery-webhook` with ``{"url", "secret"}`` (docs/batchrouter-api.md, "Registering the delivery webhook").

        A PUT that sets a value is idempotent, so it is retried like a GET. The secret is kept out
        of any error message, like the key.
        """
        answer = self._request("PUT", "/v1/auth/account/delivery-webhook", body={"url": url, "secret": secret}, secrets=(secret,))
        return _object(answer, "delivery-webhook")

    # --- transport --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, body: dict[str, Any] | None = None, secrets: tuple[str, ...] = ()) -> Any:
        """Send one request with retries; return the decoded JSON body (``{}`` for an empty one)."""
        return _decode(self._send(method, path, body=body, secrets=secrets), method, path)

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        secrets: tuple[str, ...] = (),
        stream: bool = False,
    ) -> Any:
        """Send one request with retries; return the 2xx response, or raise the named error.

        With `stream` the response body is left unread for the caller, who must release it."""
        headers = {
            "Authorization": f"Bearer {self._api_key}",
            "Accept": "application/json, application/x-ndjson;q=0.9",
            "User-Agent": self._user_agent,
        }
        payload = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            payload = json.dumps(body).encode("utf-8")
        hidden = (self._api_key, *secrets)
        for attempt in range(1, self._retries + 1):
            try:
                response = self._pool.request(
                    method,
                    self.api_url + path,
                    body=payload,
                    headers=headers,
                    timeout=self._timeout,
                    retries=False,
                    redirect=False,
                    preload_content=not stream,
                )
            except (_Urllib3Error, OSError) as exc:
                error: APIError = self._transport_error(method, path, exc, secrets)
            else:
                if 200 <= response.status < 300:
                    return response
                try:
                    error = _error_from_response(response, method, path, hidden)
                except (_Urllib3Error, OSError) as exc:  # the error body itself broke off
                    error = self._transport_error(method, path, exc, secrets)
                finally:
                    response.release_conn()
            if not isinstance(error, APITransientError) or attempt == self._retries:
                raise error
            if error.retry_after is not None:
                if error.retry_after > self._backoff_cap:
                    raise error
                delay = error.retry_after
            else:
                delay = backoff(attempt, base=_BACKOFF_BASE, cap=self._backoff_cap)
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _transport_error(self, method: str, path: str, exc: BaseException, secrets: tuple[str, ...] = ()) -> APIError:
        """A timeout or a dropped connection, named without the key or a secret in it."""
        text = f"BatchRouter {method} {path} failed: {type(exc).__name__}: {exc}"
        return APITransientError(_scrub(text, (self._api_key, *secrets)))


# --- parsing ---------------------------------------------------------------------------------------


def _segment(batch_id: str) -> str:
    """The batch id as one percent-encoded path segment: a ``/`` or ``?`` in it cannot change the path."""
    return quote(batch_id, safe="")


def _decode(response: Any, method: str, path: str) -> Any:
    if not response.data.strip():
        return {}
    try:
        return json.loads(response.data)
    except ValueError:
        raise UnexpectedResponse(
            f"BatchRouter {method} {path} answered {response.status} with a body that is not JSON",
            status=response.status,
        ) from None


def _object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise UnexpectedResponse(f"{what}: the answer is not a JSON object")
    return body


def _parse_batch(body: Any, requested_id: str) -> Batch:
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


def _parse_artifact_links(body: Any, batch_id: str) -> ArtifactLinks:
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
_NO_ARTIFACT = frozenset({404, 405, 410, 501})
_ROW_KEYS = ("data", "results", "items", "rows")
_CURSOR_KEYS = ("next_cursor", "nextCursor", "next")
#: The most a JSON results page may hold: it is parsed whole. A page of 1,000 rows is far smaller.
MAX_PAGE_BYTES = 32 << 20
_JSONL_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"})


def _read_results_page(response: Any, batch_id: str, broken: Callable[[BaseException], APIError]) -> ResultsPage:
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


# --- errors ----------------------------------------------------------------------------------------


def _error_from_response(response: Any, method: str, path: str, hidden: tuple[str, ...]) -> APIError:
    """Turn a non-2xx answer into the named exception for its status (docs/batchrouter-api.md, "Errors, retries and Retry-After").

    The envelope is ``{"error": {"code", "message", "details"}}``; a body that is not JSON (a proxy's
    HTML page) still maps by status. Unknown 4xx codes are a plain APIError, as the docs advise:
    "treat an unknown code as a generic failure for its status class".
    """
    status = response.status
    code = message = details = None
    try:
        envelope = json.loads(response.data)
    except ValueError:
        envelope = None
    if isinstance(envelope, dict) and isinstance(envelope.get("error"), dict):
        error = envelope["error"]
        code = error.get("code") if isinstance(error.get("code"), str) else None
        message = error.get("message") if isinstance(error.get("message"), str) else None
        details = error.get("details")
    if 300 <= status < 400:
        # Never followed: the bearer key must not travel to wherever the Location points.
        cls: type[APIError] = UnexpectedResponse
        message = "redirects from the API are not followed; check BATCHROUTER_API_URL"
    elif status in _ERRORS_BY_STATUS:
        cls = _ERRORS_BY_STATUS[status]
    elif status >= 500 or status == 408:
        cls = APITransientError
    else:
        cls = APIError
    text = f"BatchRouter {method} {path} answered {status}"
    if code:
        text += f" ({code})"
    if message:
        text += f": {message}"
    return cls(
        _scrub(text, hidden),
        status=status,
        code=code,
        details=details,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )


def _scrub(text: str, hidden: tuple[str, ...]) -> str:
    """`text` with every secret in `hidden` masked, in case a server or library echoes one back."""
    for secret in hidden:
        if secret:
            text = text.replace(secret, "***")
    return text

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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
from urllib3.exceptions import HTTPError as _Urllib3Error

from .. import __version__
from ..errors import (
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
from ..retry import backoff, parse_retry_after
from .answers import (
    NO_ARTIFACT,
    ArtifactLinks,
    Batch,
    ResultsPage,
    json_object,
    parse_artifact_links,
    parse_batch,
    read_results_page,
)

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
        return json_object(self._request("GET", "/v1/auth/account"), "account")

    def get_batch(self, batch_id: str) -> Batch:
        """`GET /v1/batches/{id}`: the authoritative status of a batch (docs/batchrouter-api.md, "Batch status")."""
        body = self._request("GET", f"/v1/batches/{_segment(batch_id)}")
        return parse_batch(body, batch_id)

    def get_artifact_links(self, batch_id: str) -> ArtifactLinks:
        """`GET /v1/batches/{id}/artifact-url`: fresh signed links (docs/batchrouter-api.md, "Full results: artifact-url").

        The response fields are undocumented, so every plausible spelling is accepted.
        """
        try:
            body = self._request("GET", f"/v1/batches/{_segment(batch_id)}/artifact-url")
        except APIError as exc:
            if exc.status in NO_ARTIFACT:
                raise ArtifactUnavailable(str(exc), status=exc.status, code=exc.code, details=exc.details) from None
            raise
        return parse_artifact_links(body, batch_id)

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
            yield read_results_page(response, batch_id, lambda exc: self._transport_error("GET", path, exc))
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
        return json_object(answer, "delivery-webhook")

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

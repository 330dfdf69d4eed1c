"""The emulator's Flask app: BatchRouter's API, a signed-URL artifact host, and a control API.

Three surfaces, three blueprints:

* `/v1/...` imitates the BatchRouter endpoints the receiver calls, bearer key required, including
  the response variants the public material disagrees on (batch-api-facts.md, section 9) so the
  receiver is tested against all of them;
* `/artifacts/...` imitates a presigned object-store URL: no auth, an HMAC in the query string, an
  expiry, Range support, S3-like 403s;
* `/_emulator/...` lets tests and developers create batches, complete them (which sends the
  webhook), queue faults and read counters. It has no auth: the emulator is a development tool.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from . import content
from .delivery import DEFAULT_RETRY_DELAYS, Deliverer
from .state import (
    ACTIVE_STATUSES,
    BODY_FAULTS,
    CANCEL_SPELLINGS,
    FAULT_KINDS,
    FAULT_TARGETS,
    RESULTS_FORMS,
    SHAPES,
    TERMINAL_STATUSES,
    URL_KEYS,
    Batch,
    Fault,
    State,
    WebhookTarget,
    rfc3339,
    utcnow,
)

DEFAULT_API_KEY = "br_test_emulator"
#: Host names of cloud metadata services; never a delivery target, whatever the config says.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata"})
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})


@dataclasses.dataclass
class EmulatorConfig:
    """How one emulator instance behaves. Port 0 picks a free port (`server.start_in_thread`)."""

    host: str = "127.0.0.1"
    port: int = 8081
    api_key: str = DEFAULT_API_KEY
    #: Initial delivery target, as if `PUT /v1/auth/account/delivery-webhook` had been called.
    webhook_url: str | None = None
    webhook_secret: str | None = None
    #: Base of the signed artifact URLs; None serves them under the URL the client used for the API.
    artifact_base_url: str | None = None
    url_ttl_seconds: int = 300
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    allow_insecure_webhooks: bool = False
    allow_private_webhooks: bool = False
    #: CA bundle to verify the delivery target's TLS certificate (e.g. Caddy's internal CA).
    ca_file: str | None = None


class Emulator:
    """The state and helpers shared by the blueprints; one per app."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        webhook = None
        if config.webhook_url and config.webhook_secret:
            webhook = WebhookTarget(config.webhook_url, config.webhook_secret, utcnow())
        self.state = State(webhook)
        self.deliverer = Deliverer(self.state.record_delivery, config.retry_delays, ca_file=config.ca_file)
        # A fresh random key per instance: a guessed or forged artifact URL never validates.
        self._url_key = secrets.token_bytes(32)

    # --- signed artifact URLs ---------------------------------------------------------------------

    def _url_signature(self, batch_id: str, name: str, expires: int) -> str:
        message = f"{batch_id}\n{name}\n{expires}".encode()
        return hmac.new(self._url_key, message, hashlib.sha256).hexdigest()

    def signed_url(self, batch_id: str, name: str) -> tuple[str, dt.datetime]:
        expires = int(time.time()) + self.config.url_ttl_seconds
        base = (self.config.artifact_base_url or request.host_url).rstrip("/")
        sig = self._url_signature(batch_id, name, expires)
        path = f"/artifacts/{quote(batch_id, safe='')}/{quote(name)}"
        expires_at = dt.datetime.fromtimestamp(expires, dt.UTC)
        return f"{base}{path}?expires={expires}&sig={sig}", expires_at

    def check_url(self, batch_id: str, name: str) -> str | None:
        """Why the current request's signed URL is refused, or None when it is valid."""
        try:
            expires = int(request.args.get("expires", ""))
        except ValueError:
            return "SignatureDoesNotMatch"
        expected = self._url_signature(batch_id, name, expires)
        if not hmac.compare_digest(expected, request.args.get("sig", "")):
            return "SignatureDoesNotMatch"
        if time.time() > expires:
            return "Request has expired"
        return None

    # --- deliveries -------------------------------------------------------------------------------

    def event_body(self, batch: Batch, form: str, event_id: str | None, event_type: str | None) -> dict[str, Any]:
        """A delivery for `batch` in its current status, in one of the two documented forms."""
        status = batch.spelled_status()
        if event_type is None:
            terminal = batch.status in TERMINAL_STATUSES
            event_type = f"batch.{status}" if terminal else "batch.progress"
        output_url = error_url = None
        if batch.status == "completed":
            output_url = self.signed_url(batch.id, batch.results.name)[0]
            if batch.errors is not None:
                error_url = self.signed_url(batch.id, batch.errors.name)[0]
        if form == "flat":
            return {
                "event": event_type,
                "batch_id": batch.id,
                "output_file_url": output_url,
                "error_file_url": error_url,
            }
        counts = _counts(batch)
        return {
            "id": event_id or "evt_" + secrets.token_hex(12),
            "type": event_type,
            "created": int(time.time()),
            "data": {
                "batch_id": batch.id,
                "status": status,
                "items_total": counts["total"],
                "items_completed": counts["completed"],
                "items_failed": counts["failed"],
                "cost_usd": "2.4137",
                "output_file_url": output_url,
            },
        }


def emulator() -> Emulator:
    return current_app.extensions["emulator"]


def create_app(config: EmulatorConfig | None = None) -> Flask:
    """Build an emulator app; each app has its own state, so tests can run several side by side."""
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["emulator"] = Emulator(config or EmulatorConfig())
    app.register_blueprint(api)
    app.register_blueprint(artifacts)
    app.register_blueprint(control)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.code or 500, "internal_error")
        return error(exc.code or 500, code, exc.description or exc.name)

    return app


def error(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """BatchRouter's error envelope; `code` is the stable part.

    (docs.batchrouter.com/reference/errors/)
    """
    response = jsonify(error={"code": code, "message": message, "details": details or {}})
    response.status_code = status
    response.headers.update(headers or {})
    return response


# --- faults ---------------------------------------------------------------------------------------

_STATUS_FAULTS = {
    "429": (429, "rate_limited", "Too many requests."),
    "500": (500, "internal_error", "Internal server error."),
    "503": (503, "service_unavailable", "Service temporarily unavailable."),
}


def status_fault_response(fault: Fault) -> Response | None:
    """The response of a fault that replaces the answer outright, or None for a body fault."""
    if fault.kind in _STATUS_FAULTS:
        status, code, message = _STATUS_FAULTS[fault.kind]
        headers = {}
        if fault.kind == "429":
            headers["Retry-After"] = str(fault.retry_after if fault.retry_after is not None else 1)
        return error(status, code, message, headers=headers)
    if fault.kind == "expired":
        return access_denied("Request has expired")
    return None


def faulty_body(chunks: Iterable[bytes], fault: Fault, sock: socket.socket | None) -> Iterator[bytes]:
    """Send `fault.after_bytes` of `chunks`, then break the body the way `fault.kind` says.

    The dev server closes every connection after its response (it sends `Connection: close`), so
    ending the iterator early is a clean close with a short body (`truncate`). For `drop`, SO_LINGER
    0 makes that close a TCP reset instead, as when a load balancer kills the connection.
    """
    left = fault.after_bytes
    chunks = iter(chunks)
    for chunk in chunks:
        if len(chunk) < left:
            left -= len(chunk)
            yield chunk
            continue
        if left:
            yield chunk[:left]
        rest = chunk[left:]
        break
    else:
        return
    if fault.kind == "stall":
        time.sleep(fault.stall_seconds)
        if rest:
            yield rest
        yield from chunks
        return
    if fault.kind == "drop" and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def apply_body_fault(response: Response, fault: Fault | None) -> Response:
    if fault is None or fault.kind not in BODY_FAULTS:
        return response
    body = response.response if response.is_streamed else [response.get_data()]
    response.response = faulty_body(body, fault, request.environ.get("werkzeug.socket"))
    return response


# --- /v1: the BatchRouter API ---------------------------------------------------------------------

api = Blueprint("api", __name__, url_prefix="/v1")


@api.before_request
def _api_gate() -> Response | None:
    emu = emulator()
    emu.state.count_api_request(request.path)
    fault = emu.state.take_fault("api", (request.view_args or {}).get("batch_id"))
    if fault is not None:
        replaced = status_fault_response(fault)
        if replaced is not None:
            return replaced
        g.fault = fault
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), emu.config.api_key.encode()):
        return error(401, "unauthorized", "Missing or invalid API key.")
    return None


@api.after_request
def _api_body_fault(response: Response) -> Response:
    return apply_body_fault(response, g.pop("fault", None))


@api.get("/auth/account")
def account() -> Response:
    webhook = emulator().state.webhook
    return jsonify(
        id="org_emulator",
        name="Emulator org",
        credit_balance="100.00",
        delivery_webhook={"url": webhook.url if webhook else None},
    )


@api.put("/auth/account/delivery-webhook")
def put_delivery_webhook() -> Response:
    emu = emulator()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return error(400, "invalid_request", "Body must be a JSON object.", {"body": "not a JSON object"})
    url, secret = body.get("url"), body.get("secret")
    problems = webhook_problems(url, secret, emu.config)
    if problems:
        return error(400, "invalid_request", "Invalid delivery webhook.", problems)
    target = emu.state.set_webhook(url, secret)
    return jsonify(url=target.url, secret_set=True, updated_at=rfc3339(target.updated_at))


@api.get("/batches/<batch_id>")
def get_batch(batch_id: str) -> Response:
    batch = emulator().state.get_batch(batch_id)
    if batch is None:
        return batch_not_found(batch_id)
    return jsonify(shaped_view(batch))


@api.get("/batches/<batch_id>/artifact-url")
def artifact_url(batch_id: str) -> Response:
    emu = emulator()
    batch = emu.state.get_batch(batch_id)
    if batch is None:
        return batch_not_found(batch_id)
    if batch.status != "completed":
        return not_completed(batch)
    if not batch.artifact_url:
        return error(404, "not_found", f"Batch {batch_id!r} has no artifact; page through its results.")
    url, expires_at = emu.signed_url(batch.id, batch.results.name)
    answer: dict[str, Any] = {batch.url_key: url, "expires_at": rfc3339(expires_at)}
    if batch.errors is not None:
        answer["error_file_url"] = emu.signed_url(batch.id, batch.errors.name)[0]
    return jsonify(answer)


@api.get("/batches/<batch_id>/results")
def results_page(batch_id: str) -> Response:
    batch = emulator().state.get_batch(batch_id)
    if batch is None:
        return batch_not_found(batch_id)
    if batch.status != "completed":
        return not_completed(batch)
    if batch.results_form == "jsonl":  # the whole file, whatever limit or cursor asked
        headers = {"Content-Length": str(batch.results.size)}
        return Response(batch.results.iter_bytes(), headers=headers, content_type="application/x-ndjson", direct_passthrough=True)
    try:
        limit = int(request.args.get("limit", 100))
        if not 1 <= limit <= 1000:
            raise ValueError
    except ValueError:
        details = {"limit": "an integer from 1 to 1000"}
        return error(400, "invalid_request", "Invalid limit.", details)
    try:
        offset = int(request.args.get("cursor") or 0)
        if offset < 0:
            raise ValueError
    except ValueError:
        details = {"cursor": "not a cursor we issued"}
        return error(400, "invalid_request", "Invalid cursor.", details)
    rows = batch.results.rows(offset, limit)
    end = offset + len(rows)
    has_more = end < batch.results.lines
    return jsonify(data=rows, next_cursor=str(end) if has_more else None, has_more=has_more)


def batch_not_found(batch_id: str) -> Response:
    return error(404, "not_found", f"No batch {batch_id!r}.")


def not_completed(batch: Batch) -> Response:
    return error(
        409,
        "batch_not_completed",
        "Results are only available on completed batches.",
        {"status": batch.spelled_status()},
    )


def _counts(batch: Batch) -> dict[str, int]:
    done = batch.status in TERMINAL_STATUSES
    return {
        "total": batch.items,
        "completed": batch.items - batch.error_items if done else 0,
        "failed": batch.error_items if done else 0,
    }


def batch_view(batch: Batch) -> dict[str, Any]:
    """The documented top-level batch object (docs.batchrouter.com/guides/results/)."""
    return {
        "id": batch.id,
        "status": batch.spelled_status(),
        "item_count": batch.items,
        "created_at": rfc3339(batch.created_at),
        "sla_deadline": rfc3339(batch.created_at + dt.timedelta(hours=24)),
        "routing_mode": "auto",
        "sla_tier": "standard",
        "counts": _counts(batch),
    }


def shaped_view(batch: Batch) -> dict[str, Any]:
    """The batch as this batch's `shape` says: plain, `{"batch": …}`, or wrapped with `state`.

    The wrapped `state` form is what live operator tooling reads (batchrouter-api-facts.md, S6).
    """
    view = batch_view(batch)
    if batch.shape == "plain":
        return view
    if batch.shape == "state":
        view = {("state" if key == "status" else key): value for key, value in view.items()}
    return {"batch": view}


def webhook_problems(url: Any, secret: Any, config: EmulatorConfig) -> dict[str, str]:
    """Field -> reason for a delivery webhook BatchRouter would refuse; empty when it is fine."""
    problems: dict[str, str] = {}
    if not isinstance(secret, str) or not 8 <= len(secret) <= 256:
        problems["secret"] = "must be a string of 8 to 256 characters"
    if not isinstance(url, str) or not url:
        problems["url"] = "is required"
        return problems
    parts = urlsplit(url)
    allowed = ("https", "http") if config.allow_insecure_webhooks else ("https",)
    if parts.scheme not in allowed:
        problems["url"] = "must use https"
    elif not parts.hostname:
        problems["url"] = "has no host"
    else:
        reason = host_refusal(parts.hostname, config.allow_private_webhooks)
        if reason:
            problems["url"] = reason
    return problems


def host_refusal(host: str, allow_private: bool) -> str | None:
    """Why deliveries may not go to `host`, or None. Metadata endpoints are refused always."""
    if host.lower().rstrip(".") in METADATA_HOSTS:
        return "must not point at a cloud metadata endpoint"
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return "host does not resolve"
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address in METADATA_ADDRESSES:
            return "must not point at a cloud metadata endpoint"
        if not allow_private and (
            address.is_private
            or address.is_loopback
            or address.is_link_local
            or address.is_reserved
            or address.is_multicast
            or address.is_unspecified
        ):
            return "must not resolve to a private, loopback or link-local address"
    return None


# --- /artifacts: the presigned-URL host -----------------------------------------------------------

artifacts = Blueprint("artifacts", __name__, url_prefix="/artifacts")


def access_denied(message: str, code: str = "AccessDenied") -> Response:
    """An S3-style 403, which is what an expired or tampered presigned URL gets."""
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return Response(body, status=403, content_type="application/xml")


@artifacts.get("/<batch_id>/<name>")
def artifact(batch_id: str, name: str) -> Response:
    emu = emulator()
    # Counted before anything else: tests assert the receiver never sends its API key here.
    emu.state.count_artifact_request(batch_id, "Authorization" in request.headers)
    problem = emu.check_url(batch_id, name)
    if problem == "SignatureDoesNotMatch":
        return access_denied("The request signature we calculated does not match.", problem)
    if problem:
        return access_denied(problem)
    batch = emu.state.get_batch(batch_id)
    file = batch.artifact(name) if batch is not None else None
    if batch is None or file is None:
        return Response(
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
            "<Message>The specified key does not exist.</Message></Error>",
            status=404,
            content_type="application/xml",
        )
    fault = emu.state.take_fault("artifact", batch_id)
    if fault is not None:
        replaced = status_fault_response(fault)
        if replaced is not None:
            return replaced
    return apply_body_fault(serve_file(batch, file), fault)


def serve_file(batch: Batch, file: content.AnyArtifact) -> Response:
    """200 with the whole file, or 206 for one `Range` (unless the batch has ranges off)."""
    size = file.size
    etag = '"' + hashlib.sha1(f"{batch.id}/{file.name}/{size}".encode()).hexdigest() + '"'
    headers = {"ETag": etag}
    start, stop, status = 0, size, 200
    if batch.ranges:
        headers["Accept-Ranges"] = "bytes"
        wanted = request.range if "Range" in request.headers else None
        if_range = request.headers.get("If-Range")
        if wanted is not None and len(wanted.ranges) == 1 and if_range in (None, etag):
            span = wanted.range_for_length(size)
            if span is None:
                return Response(status=416, headers={"Content-Range": f"bytes */{size}", "Content-Length": "0"})
            start, stop = span
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    headers["Content-Length"] = str(stop - start)
    return Response(
        file.iter_bytes(start, stop),
        status=status,
        headers=headers,
        content_type=file.content_type,
        direct_passthrough=True,
    )


# --- /_emulator: control API for tests and developers ---------------------------------------------

control = Blueprint("control", __name__, url_prefix="/_emulator")


class _Invalid(Exception):
    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason


@control.errorhandler(_Invalid)
def _invalid(exc: _Invalid) -> Response:
    return error(400, "invalid_request", f"{exc.field}: {exc.reason}", {exc.field: exc.reason})


def _json_object() -> dict[str, Any]:
    if not request.get_data():
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise _Invalid("body", "must be a JSON object")
    return body


def _int(body: dict[str, Any], field: str, default: int | None, minimum: int = 0) -> int | None:
    value = body.get(field, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _Invalid(field, f"must be an integer >= {minimum}")
    return value


def _bool(body: dict[str, Any], field: str, default: bool) -> bool:
    value = body.get(field, default)
    if not isinstance(value, bool):
        raise _Invalid(field, "must be true or false")
    return value


def _choice(body: dict[str, Any], field: str, default: str, choices: Iterable[str]) -> str:
    value = body.get(field, default)
    choices = tuple(choices)
    if value not in choices:
        raise _Invalid(field, "must be one of " + ", ".join(choices))
    return value


def _status(body: dict[str, Any], default: str) -> str:
    value = body.get("status", default)
    if value == "canceled":
        value = "cancelled"
    return _choice({"status": value}, "status", default, ACTIVE_STATUSES + TERMINAL_STATUSES)


@control.post("/batches")
def create_batch() -> tuple[Response, int]:
    emu = emulator()
    body = _json_object()
    batch_id = body.get("id") or "bat_" + secrets.token_hex(8)
    if not isinstance(batch_id, str) or len(batch_id) > 200 or "/" in batch_id or not batch_id.isprintable():
        raise _Invalid("id", "must be at most 200 printable characters without '/'")
    line_bytes = _int(body, "line_bytes", 200, minimum=1)
    assert line_bytes is not None
    size_bytes = _int(body, "size_bytes", None)
    items = size_bytes // line_bytes if size_bytes is not None else _int(body, "items", 10)
    assert items is not None
    error_items = _int(body, "error_items", 0)
    assert error_items is not None
    if error_items > items:
        raise _Invalid("error_items", "must not exceed items")
    shortest = content.min_line_bytes(items, error_items)
    if line_bytes < shortest:
        raise _Invalid("line_bytes", f"must be at least {shortest} for this batch")
    compress = _bool(body, "gzip", False)
    if compress and items * line_bytes > 256 * 1024 * 1024:
        raise _Invalid("gzip", "gzip batches are compressed in memory: at most 256 MiB")
    batch = Batch(
        id=batch_id,
        status=_status(body, "processing"),
        items=items,
        line_bytes=line_bytes,
        error_items=error_items,
        results=content.results_file(items, line_bytes, error_items, compress),
        errors=content.errors_file(items, line_bytes, error_items, compress),
        gzip=compress,
        ranges=_bool(body, "ranges", True),
        shape=_choice(body, "shape", "plain", SHAPES),
        url_key=_choice(body, "url_key", "url", URL_KEYS),
        cancel_spelling=_choice(body, "cancel_spelling", "cancelled", CANCEL_SPELLINGS),
        artifact_url=_bool(body, "artifact_url", True),
        results_form=_choice(body, "results_form", "json", RESULTS_FORMS),
    )
    if batch.results_form == "jsonl" and compress:
        raise _Invalid("results_form", "jsonl pages are not offered for gzip batches")
    # `deliver: true` on a finished batch sends its webhook at once, as /complete would: the one-step
    # example that `receiver serve --emulator` prints.
    deliver = _bool(body, "deliver", False)
    if deliver and batch.status not in TERMINAL_STATUSES:
        raise _Invalid("deliver", "needs a finished status (completed, failed, cancelled, expired); or use /complete later")
    if deliver and emu.state.webhook is None:
        return error(409, "no_delivery_webhook", "No delivery webhook is set."), 409
    if not emu.state.add_batch(batch):
        return error(409, "already_exists", f"Batch {batch_id!r} exists already."), 409
    answer = batch_view(batch)
    if batch.results.digest_is_cheap:
        answer.update(batch.results.digest())
    target = emu.state.webhook
    if deliver and target is not None:
        event = emu.event_body(batch, "envelope", None, None)
        text = json.dumps(event, separators=(",", ":"))
        answer["event_id"] = event["id"]
        answer.update(_send(emu, target.url, target.secret, text.encode(), batch.id, event["id"], 1, False))
    return jsonify(answer), 201


@control.get("/batches/<batch_id>")
def describe_batch(batch_id: str) -> Response:
    batch = emulator().state.get_batch(batch_id)
    if batch is None:
        return batch_not_found(batch_id)
    return jsonify(
        batch=batch_view(batch),
        options={
            "line_bytes": batch.line_bytes,
            "error_items": batch.error_items,
            "gzip": batch.gzip,
            "ranges": batch.ranges,
            "shape": batch.shape,
            "url_key": batch.url_key,
            "cancel_spelling": batch.cancel_spelling,
            "artifact_url": batch.artifact_url,
            "results_form": batch.results_form,
        },
        results=batch.results.digest(),
        errors=batch.errors.digest() if batch.errors is not None else None,
    )


@control.post("/batches/<batch_id>/complete")
def complete_batch(batch_id: str) -> Response:
    emu = emulator()
    body = _json_object()
    status = _status(body, "completed")
    form = _choice(body, "form", "envelope", ("envelope", "flat"))
    deliver = _bool(body, "deliver", True)
    wait = _bool(body, "wait", False)
    copies = _int(body, "copies", 1, minimum=1) or 1
    event_id = body.get("event_id")
    event_type = body.get("type")
    for field, value in (("event_id", event_id), ("type", event_type)):
        if value is not None and not isinstance(value, str):
            raise _Invalid(field, "must be a string")
    if emu.state.get_batch(batch_id) is None:
        return batch_not_found(batch_id)
    target = emu.state.webhook
    if deliver and target is None:
        return error(409, "no_delivery_webhook", "No delivery webhook is set.")
    batch = emu.state.set_status(batch_id, status)
    assert batch is not None
    event = emu.event_body(batch, form, event_id, event_type)
    text = json.dumps(event, separators=(",", ":"))
    answer: dict[str, Any] = {"event_id": event.get("id"), "body": text, "delivery_ids": []}
    if deliver and target is not None:
        sent = _send(emu, target.url, target.secret, text.encode(), batch.id, event.get("id"), copies, wait)
        answer.update(sent)
    return jsonify(answer)


@control.post("/deliveries")
def send_delivery() -> Response:
    emu = emulator()
    body = _json_object()
    if "body" not in body:
        raise _Invalid("body", "is required")
    payload = body["body"]
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    target = emu.state.webhook
    url = body.get("url") or (target.url if target else None)
    secret = body.get("secret") or (target.secret if target else None)
    if not isinstance(url, str) or not isinstance(secret, str):
        return error(409, "no_delivery_webhook", "No delivery webhook is set; give url and secret.")
    event_id = batch_id = None
    if isinstance(payload, dict):
        event_id = payload.get("id")
        data = payload.get("data")
        if isinstance(data, dict):
            batch_id = data.get("batch_id")
        batch_id = payload.get("batch_id") or batch_id
    copies = _int(body, "copies", 1, minimum=1) or 1
    answer = {"event_id": event_id, "body": text}
    wait = _bool(body, "wait", False)
    answer.update(_send(emu, url, secret, text.encode(), batch_id, event_id, copies, wait))
    return jsonify(answer)


def _send(
    emu: Emulator,
    url: str,
    secret: str,
    body: bytes,
    batch_id: Any,
    event_id: Any,
    copies: int,
    wait: bool,
) -> dict[str, Any]:
    ids = emu.deliverer.send(
        url,
        secret,
        body,
        batch_id=batch_id if isinstance(batch_id, str) else None,
        event_id=event_id if isinstance(event_id, str) else None,
        copies=copies,
        wait=wait,
    )
    answer: dict[str, Any] = {"delivery_ids": ids}
    if wait:
        answer["attempts"] = [r for r in emu.state.deliveries() if r["delivery_id"] in ids]
    return answer


@control.post("/faults")
def add_fault() -> tuple[Response, int]:
    body = _json_object()
    target = _choice(body, "target", "artifact", FAULT_TARGETS)
    kind = str(body.get("kind"))
    if kind not in FAULT_KINDS:
        raise _Invalid("kind", "must be one of " + ", ".join(FAULT_KINDS))
    if target == "api" and kind == "expired":
        raise _Invalid("kind", "expired applies to artifact URLs only")
    batch_id = body.get("batch_id")
    if batch_id is not None and not isinstance(batch_id, str):
        raise _Invalid("batch_id", "must be a string")
    stall = body.get("stall_seconds", 5.0)
    if isinstance(stall, bool) or not isinstance(stall, (int, float)) or stall < 0:
        raise _Invalid("stall_seconds", "must be a number >= 0")
    fault = emulator().state.add_fault(
        target=target,
        kind=kind,
        batch_id=batch_id,
        remaining=_int(body, "count", 1, minimum=1) or 1,
        after_bytes=_int(body, "after_bytes", 0) or 0,
        retry_after=_int(body, "retry_after", None),
        stall_seconds=float(stall),
    )
    return jsonify(fault=fault.to_dict()), 201


@control.get("/faults")
def list_faults() -> Response:
    return jsonify(faults=emulator().state.faults())


@control.delete("/faults")
def clear_faults() -> Response:
    emulator().state.clear_faults()
    return jsonify(faults=[])


@control.get("/stats")
def stats() -> Response:
    return jsonify(emulator().state.stats())


@control.post("/reset")
def reset() -> Response:
    emu = emulator()
    emu.deliverer.cancel_pending()
    emu.state.reset()
    return jsonify(status="reset")

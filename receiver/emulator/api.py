"""`/v1/...`: the BatchRouter endpoints the receiver calls, behind the bearer key.

Every request passes one gate: it is counted, may take a queued `api` fault, and must carry the key.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, g, jsonify, request

from .faults import apply_body_fault, status_fault_response
from .instance import EmulatorConfig, emulator
from .responses import batch_not_found, error, not_completed, shaped_view
from .state import rfc3339

#: Host names of cloud metadata services; never a delivery target, whatever the config says.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata"})
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})

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
    assert isinstance(url, str) and isinstance(secret, str)  # webhook_problems checked both
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

"""`/_emulator/...`: the control API for tests and developers; no auth, it is a development tool.

Create and complete batches (completing sends the webhook), send any delivery, queue faults, read
the counters and reset.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from flask import Blueprint, Response, jsonify

from . import content
from .instance import Emulator, emulator
from .parsing import Invalid, batch_status, boolean, choice, integer, json_object
from .responses import batch_not_found, batch_view, error
from .state import CANCEL_SPELLINGS, FAULT_KINDS, FAULT_TARGETS, RESULTS_FORMS, SHAPES, TERMINAL_STATUSES, URL_KEYS, Batch

control = Blueprint("control", __name__, url_prefix="/_emulator")


@control.errorhandler(Invalid)
def _invalid(exc: Invalid) -> Response:
    return error(400, "invalid_request", f"{exc.field}: {exc.reason}", {exc.field: exc.reason})


@control.post("/batches")
def create_batch() -> tuple[Response, int]:
    emu = emulator()
    body = json_object()
    batch_id = body.get("id") or "bat_" + secrets.token_hex(8)
    if not isinstance(batch_id, str) or len(batch_id) > 200 or "/" in batch_id or not batch_id.isprintable():
        raise Invalid("id", "must be at most 200 printable characters without '/'")
    line_bytes = integer(body, "line_bytes", 200, minimum=1)
    assert line_bytes is not None
    size_bytes = integer(body, "size_bytes", None)
    items = size_bytes // line_bytes if size_bytes is not None else integer(body, "items", 10)
    assert items is not None
    error_items = integer(body, "error_items", 0)
    assert error_items is not None
    if error_items > items:
        raise Invalid("error_items", "must not exceed items")
    shortest = content.min_line_bytes(items, error_items)
    if line_bytes < shortest:
        raise Invalid("line_bytes", f"must be at least {shortest} for this batch")
    compress = boolean(body, "gzip", False)
    if compress and items * line_bytes > 256 * 1024 * 1024:
        raise Invalid("gzip", "gzip batches are compressed in memory: at most 256 MiB")
    batch = Batch(
        id=batch_id,
        status=batch_status(body, "processing"),
        items=items,
        line_bytes=line_bytes,
        error_items=error_items,
        results=content.results_file(items, line_bytes, error_items, compress),
        errors=content.errors_file(items, line_bytes, error_items, compress),
        gzip=compress,
        ranges=boolean(body, "ranges", True),
        shape=choice(body, "shape", "plain", SHAPES),
        url_key=choice(body, "url_key", "url", URL_KEYS),
        cancel_spelling=choice(body, "cancel_spelling", "cancelled", CANCEL_SPELLINGS),
        artifact_url=boolean(body, "artifact_url", True),
        results_form=choice(body, "results_form", "json", RESULTS_FORMS),
    )
    if batch.results_form == "jsonl" and compress:
        raise Invalid("results_form", "jsonl pages are not offered for gzip batches")
    # `deliver: true` on a finished batch sends its webhook at once, as /complete would: the one-step
    # example that `receiver serve --emulator` prints.
    deliver = boolean(body, "deliver", False)
    if deliver and batch.status not in TERMINAL_STATUSES:
        raise Invalid("deliver", "needs a finished status (completed, failed, cancelled, expired); or use /complete later")
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
    body = json_object()
    status = batch_status(body, "completed")
    form = choice(body, "form", "envelope", ("envelope", "flat"))
    deliver = boolean(body, "deliver", True)
    wait = boolean(body, "wait", False)
    copies = integer(body, "copies", 1, minimum=1) or 1
    event_id = body.get("event_id")
    event_type = body.get("type")
    for field, value in (("event_id", event_id), ("type", event_type)):
        if value is not None and not isinstance(value, str):
            raise Invalid(field, "must be a string")
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
    body = json_object()
    if "body" not in body:
        raise Invalid("body", "is required")
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
    copies = integer(body, "copies", 1, minimum=1) or 1
    answer = {"event_id": event_id, "body": text}
    wait = boolean(body, "wait", False)
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
    body = json_object()
    target = choice(body, "target", "artifact", FAULT_TARGETS)
    kind = str(body.get("kind"))
    if kind not in FAULT_KINDS:
        raise Invalid("kind", "must be one of " + ", ".join(FAULT_KINDS))
    if target == "api" and kind == "expired":
        raise Invalid("kind", "expired applies to artifact URLs only")
    batch_id = body.get("batch_id")
    if batch_id is not None and not isinstance(batch_id, str):
        raise Invalid("batch_id", "must be a string")
    stall = body.get("stall_seconds", 5.0)
    if isinstance(stall, bool) or not isinstance(stall, (int, float)) or stall < 0:
        raise Invalid("stall_seconds", "must be a number >= 0")
    fault = emulator().state.add_fault(
        target=target,
        kind=kind,
        batch_id=batch_id,
        remaining=integer(body, "count", 1, minimum=1) or 1,
        after_bytes=integer(body, "after_bytes", 0) or 0,
        retry_after=integer(body, "retry_after", None),
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

"""The hook: verify, validate, record, answer. No network I/O here.

BatchRouter gives a short ack window (10 s in its older docs) and retries anything that is not a 2xx,
so this handler only does what must happen before the 200: check the signature over the raw bytes,
parse and validate, and commit the delivery (and its job) to the ledger. Downloads are the worker's.
"""

from __future__ import annotations

import json
import logging

from flask import Blueprint, Response, current_app, jsonify, request

from .. import metrics
from ..config import Settings
from ..errors import LedgerUnavailable, PayloadError, SignatureError
from ..ledger import Ledger
from ..signature import HEADER, verify
from .schemas import parse_delivery

log = logging.getLogger(__name__)

bp = Blueprint("ingest", __name__)

#: How stale the secrets may be before a signature that matched none of them is checked again.
RECHECK_SECONDS = 0.05


@bp.post("/hooks/batchrouter")
def receive() -> tuple[Response, int]:
    settings = current_app.config["RECEIVER_SETTINGS"]
    ledger: Ledger = current_app.extensions["receiver.ledger"]

    if not _is_json(request.mimetype):
        return _answer("unsupported_media_type", "Content-Type must be application/json", 415)
    length = request.content_length
    if length is not None and length > settings.web.max_body_bytes:
        return _closing(_answer("payload_too_large", f"body is over {settings.web.max_body_bytes} bytes", 413))
    try:
        raw = request.stream.read(settings.web.max_body_bytes + 1)
    except OSError:  # the client stalled past its read deadline (gunicorn_worker.py) or vanished
        metrics.DELIVERIES.labels("invalid").inc()
        return _closing(_answer("request_timeout", "the request body did not arrive in time", 408))
    if len(raw) > settings.web.max_body_bytes:
        return _closing(_answer("payload_too_large", f"body is over {settings.web.max_body_bytes} bytes", 413))

    try:
        _verify(ledger, settings, request.headers.get(HEADER), raw)
    except SignatureError as exc:
        metrics.DELIVERIES.labels("unauthorized").inc()
        _note_refused(ledger)
        return _answer("invalid_signature", str(exc), 401)
    except LedgerUnavailable as exc:
        log.error("ledger unavailable while reading secrets: %s", exc)
        return _answer("ledger_unavailable", "the ledger cannot be read; retry later", 503)

    try:
        body = json.loads(raw)
        delivery = parse_delivery(body, raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        metrics.DELIVERIES.labels("invalid").inc()
        return _answer("invalid_json", f"body is not valid JSON: {str(exc)[:200]}", 400)
    except PayloadError as exc:
        metrics.DELIVERIES.labels("invalid").inc()
        return _answer("invalid_payload", str(exc), 400, errors=exc.errors)

    try:
        result = ledger.record_delivery(delivery)
    except LedgerUnavailable as exc:
        log.error("delivery %s not recorded: %s", delivery.event_id, exc)
        metrics.DELIVERIES.labels("unavailable").inc()
        return _answer("ledger_unavailable", "the delivery could not be recorded; retry later", 503)

    metrics.DELIVERIES.labels(result.outcome).inc()
    # One line per delivery that starts work or repeats one; the progress events we only acknowledge
    # are counted in metrics and logged at debug: a line each is too much of ingest's CPU (BENCHMARKS.md).
    (log.debug if result.outcome == "ignored" else log.info)(
        "delivery %s %s batch=%s: %s%s",
        delivery.event_id,
        delivery.event_type,
        delivery.batch_id,
        result.outcome,
        " (job queued)" if result.job_queued else "",
        extra={"event_id": delivery.event_id, "batch_id": delivery.batch_id, "outcome": result.outcome},
    )
    return jsonify(status=result.outcome, event_id=delivery.event_id), 200


def _verify(ledger: Ledger, settings: Settings, signature: str | None, raw: bytes) -> None:
    """Check the signature against every accepted secret; raise SignatureError or LedgerUnavailable.

    A secret `register --rotate` stored since this process last read them fails against the cached
    copy, so look again before refusing (at most every RECHECK_SECONDS, so bad signatures cannot make
    every request a database read).
    """
    accepted = ledger.accepted_secrets() + settings.web.webhook_secrets
    try:
        verify(signature, raw, accepted)
    except SignatureError:
        fresher = ledger.accepted_secrets(max_age=RECHECK_SECONDS) + settings.web.webhook_secrets
        if fresher == accepted:
            raise
        verify(signature, raw, fresher)


def _note_refused(ledger: Ledger) -> None:
    """Count the refusal in the ledger too, so `receiver status` can warn of a wrong secret (at
    most one write a second per process; the body is never recorded)."""
    try:
        ledger.note_refused_delivery()
    except LedgerUnavailable as exc:
        log.warning("a refused delivery was not counted in the ledger: %s", exc)


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def _answer(code: str, message: str, status: int, **extra: object) -> tuple[Response, int]:
    return jsonify(error={"code": code, "message": message, **extra}), status


def _closing(answer: tuple[Response, int]) -> tuple[Response, int]:
    """Close the connection after this answer: the body was not read to its end, and keeping the
    connection would make gunicorn read (and wait for) the rest of it first."""
    answer[0].headers["Connection"] = "close"
    return answer

"""What more than one blueprint answers: BatchRouter's error envelope, S3's 403, and batch views.

The blueprints import these rather than each other, so each surface stays a module of its own.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Response, jsonify

from .state import TERMINAL_STATUSES, Batch, rfc3339


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


def access_denied(message: str, code: str = "AccessDenied") -> Response:
    """An S3-style 403, which is what an expired or tampered presigned URL gets."""
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return Response(body, status=403, content_type="application/xml")


def batch_not_found(batch_id: str) -> Response:
    return error(404, "not_found", f"No batch {batch_id!r}.")


def not_completed(batch: Batch) -> Response:
    return error(
        409,
        "batch_not_completed",
        "Results are only available on completed batches.",
        {"status": batch.spelled_status()},
    )


def batch_counts(batch: Batch) -> dict[str, int]:
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
        "counts": batch_counts(batch),
    }


def shaped_view(batch: Batch) -> dict[str, Any]:
    """The batch as this batch's `shape` says: plain, `{"batch": …}`, or wrapped with `state`.

    The wrapped `state` form is what live operator tooling reads (docs/batchrouter-api.md, "Batch status"; S6).
    """
    view = batch_view(batch)
    if batch.shape == "plain":
        return view
    if batch.shape == "state":
        view = {("state" if key == "status" else key): value for key, value in view.items()}
    return {"batch": view}

"""The delivery payload, validated with marshmallow: tolerant of what we ignore, strict on what we use.

BatchRouter has documented two shapes (docs/batchrouter-api.md, "Deliveries") and the current docs do
not say which is live, so both are accepted:

* the envelope ``{"id", "type", "created", "data": {"batch_id", "status", ...}}``;
* the flat form ``{"event", "batch_id", "output_file_url", "error_file_url"}``.

Unknown fields are accepted and ignored. What we act on — the event type, the batch id (which becomes a
storage path segment), the status and the event id — is checked. A URL in the body is never used.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validates_schema

from ..batch_status import TERMINAL_EVENTS, TERMINAL_STATUSES
from ..errors import PayloadError, UnsafeBatchId
from ..layout import validate_batch_id
from ..ledger import Delivery


class _Short(fields.String):
    """A string we store or act on: 1-200 characters the ledger can hold on SQLite and PostgreSQL
    alike (valid Unicode, no NUL).

    JSON allows lone surrogates (``"\\ud800"``) and ``"\\u0000"``; neither encodes to UTF-8 text
    in the database, and failing there would answer 503, which BatchRouter retries for a day.
    Checked in the field rather than as a chain of validators: the hook loads a dozen of these per
    delivery, and the chain was a fifth of marshmallow's time (BENCHMARKS.md, "Ingest").
    """

    default_error_messages = {
        "length": "Length must be between 1 and 200.",
        "nul": "must not contain NUL characters",
        "surrogate": "must be valid Unicode (no lone surrogates)",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text: str = super()._deserialize(value, attr, data, **kwargs)
        if not 1 <= len(text) <= 200:
            raise self.make_error("length")
        if "\x00" in text:
            raise self.make_error("nul")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise self.make_error("surrogate") from None
        return text


class _Inner(Schema):
    """`data` of the envelope or the `batch` object: only the fields we read are typed."""

    class Meta:
        unknown = EXCLUDE  # accepted and ignored: nothing reads them

    batch_id = _Short(allow_none=True)
    id = _Short(allow_none=True)
    status = _Short(allow_none=True)
    state = _Short(allow_none=True)


class DeliverySchema(Schema):
    """Both delivery shapes in one schema; `load` returns a :class:`Delivery`."""

    class Meta:
        unknown = EXCLUDE  # accepted and ignored: nothing reads them

    id = _Short(allow_none=True)
    event_id = _Short(allow_none=True)
    type = _Short(allow_none=True)
    event = _Short(allow_none=True)
    batch_id = _Short(allow_none=True)
    status = _Short(allow_none=True)
    state = _Short(allow_none=True)
    data = fields.Nested(_Inner, allow_none=True)
    batch = fields.Nested(_Inner, allow_none=True)

    @validates_schema
    def _needs_an_event(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not (data.get("type") or data.get("event") or _status(data)):
            raise ValidationError("an event type ('type' or 'event') or a status is required", "type")


_TOP_LEVEL = frozenset(DeliverySchema._declared_fields)
_INNER = frozenset(_Inner._declared_fields)


def _fields_in(body: dict[str, Any]) -> frozenset[str]:
    """The declared fields `body` has, nested ones as ``"data.batch_id"`` (marshmallow's `only`)."""
    present = [key for key in body if key in _TOP_LEVEL]
    for name in ("data", "batch"):
        inner = body.get(name)
        if isinstance(inner, dict):
            present += [f"{name}.{key}" for key in inner if key in _INNER]
    return frozenset(present)


@functools.lru_cache(maxsize=64)
def _schema_for(fields_present: frozenset[str]) -> DeliverySchema:
    """The schema limited to the fields a body has: it loads the same, but marshmallow no longer
    visits the dozen declared fields each shape lacks (a third of its time per delivery). Bodies
    come in two or three shapes, so a handful of schemas serve them all."""
    return DeliverySchema(only=fields_present)


def parse_delivery(body: object, raw: bytes) -> Delivery:
    """Validate a decoded JSON body; raise :class:`PayloadError` with field errors when it fails."""
    if not isinstance(body, dict):
        raise PayloadError("the body must be a JSON object", {"_schema": ["not a JSON object"]})
    try:
        data = _schema_for(_fields_in(body)).load(body)
    except ValidationError as exc:
        raise PayloadError("the delivery failed validation", _jsonable(exc.messages)) from None

    status = _status(data)
    event_type = data.get("type") or data.get("event") or f"batch.{status}"
    terminal = event_type.lower() in TERMINAL_EVENTS or (status or "").lower() in TERMINAL_STATUSES
    batch_id = _batch_id(data)
    if batch_id is not None:
        try:
            validate_batch_id(batch_id)
        except UnsafeBatchId as exc:
            raise PayloadError(str(exc), exc.errors) from None
    elif terminal:
        raise PayloadError(
            "a terminal event needs a batch id ('data.batch_id', 'batch_id' or 'batch.id')",
            {"batch_id": ["missing"]},
        )
    event_id = data.get("id") or data.get("event_id") or derived_event_id(batch_id, event_type, raw)
    return Delivery(event_id=event_id, event_type=event_type, batch_id=batch_id, status=status, terminal=terminal)


def derived_event_id(batch_id: str | None, event_type: str, raw: bytes) -> str:
    """A deterministic id for a payload that has none, so its redeliveries deduplicate.

    From the batch id and event type (docs/architecture.md, "The public interface"); a body without a batch id (a non-terminal event
    we only acknowledge) is identified by its bytes instead.
    """
    if batch_id is not None:
        seed = f"{batch_id}\x00{event_type.lower()}".encode()
    else:
        seed = b"body\x00" + raw
    return "derived_" + hashlib.sha256(seed).hexdigest()[:32]


def _status(data: dict[str, Any]) -> str | None:
    for holder in (data.get("data") or {}, data, data.get("batch") or {}):
        value = holder.get("status") or holder.get("state")
        if value:
            return value
    return None


def _batch_id(data: dict[str, Any]) -> str | None:
    inner = data.get("data") or {}
    batch = data.get("batch") or {}
    return inner.get("batch_id") or data.get("batch_id") or batch.get("id") or batch.get("batch_id")


def _jsonable(messages: Any) -> Any:
    """marshmallow's messages may key nested errors by int; JSON wants strings."""
    if isinstance(messages, dict):
        return {str(k): _jsonable(v) for k, v in messages.items()}
    if isinstance(messages, list):
        return [_jsonable(v) for v in messages]
    return messages

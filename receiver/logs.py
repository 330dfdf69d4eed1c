"""Logging set up once per process, with a filter that keeps secrets out of every line.

Secrets are never passed to a logger on purpose; the filter is the second line of defence, for a
library that logs a header or a URL with a token in it.

Two formats: `text` (the default, for a terminal) and `json` (RECEIVER_LOG_FORMAT=json: one object
per line for a log pipeline, with the event id, batch id, job attempt and outcome where the line
knows them: from `extra=` on the call, or from :func:`bind` around a job).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]+"),
    re.compile(r"\b((?:br|ob|bk)_(?:live|test)_)[A-Za-z0-9._\-]+"),
    re.compile(
        r"(?i)((?:secret|api[_-]?key|token|signature|sig|x-amz-signature|x-amz-credential)[\"']?\s*[=:]\s*[\"']?)[^\s&\"',]+"
    ),
]


def redact(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(r"\1[redacted]", text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


#: The fields a JSON line carries when known; `extra=` on a call or :func:`bind` supplies them.
FIELDS = ("event_id", "batch_id", "attempt", "outcome")

_bound: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("receiver_log_fields", default=MappingProxyType({}))


def bind(**fields: Any) -> contextvars.Token[Mapping[str, Any]]:
    """Attach fields (a job's batch id and attempt) to every line this thread logs until
    :func:`unbind`. Threads of a pool reuse their context, so always unbind in a `finally`."""
    return _bound.set({**_bound.get(), **fields})


def unbind(token: contextvars.Token[Mapping[str, Any]]) -> None:
    _bound.reset(token)


class JSONFormatter(logging.Formatter):
    """One JSON object per line. The message is already redacted by the filter; the exception text
    is redacted here because it is formatted after the filters ran."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        bound = _bound.get()
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is None:
                value = bound.get(field)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


_configured = False


def configure_logging(level: int = logging.INFO, log_format: str = "text") -> None:
    """One handler on stderr, redacting; idempotent (gunicorn workers and tests call it again)."""
    global _configured
    if _configured:
        return
    _configured = True
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger("receiver")
    root.setLevel(level)
    root.addHandler(handler)
    root.propagate = False
    for name in ("urllib3", "botocore", "werkzeug", "gunicorn.error"):
        logging.getLogger(name).addFilter(RedactingFilter())

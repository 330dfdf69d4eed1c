"""Logging set up once per process, with a filter that keeps secrets out of every line.

Secrets are never passed to a logger on purpose; the filter is the second line of defence, for a
library that logs a header or a URL with a token in it.
"""

from __future__ import annotations

import logging
import re
import sys

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


_configured = False


def configure_logging(level: int = logging.INFO) -> None:
    """One handler on stderr, redacting; idempotent (gunicorn workers and tests call it again)."""
    global _configured
    if _configured:
        return
    _configured = True
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger("receiver")
    root.setLevel(level)
    root.addHandler(handler)
    root.propagate = False
    for name in ("urllib3", "botocore", "werkzeug", "gunicorn.error"):
        logging.getLogger(name).addFilter(RedactingFilter())

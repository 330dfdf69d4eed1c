"""How long to wait before trying again: one backoff formula and one `Retry-After` reader.

The API client, the artifact download and the worker's job retries all wait the same way: capped
exponential backoff with jitter, unless the server said how long (docs/batchrouter-api.md, "Errors,
retries and Retry-After": honour Retry-After when present, otherwise back off with jitter).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import random


def backoff(attempt: int, *, base: float, cap: float) -> float:
    """Seconds before retry number `attempt` (1 for the first retry): `base` doubling per attempt
    up to `cap`, times a random factor in [0.5, 1.0] so that many clients that failed together do
    not come back together."""
    return min(cap, base * 2 ** max(0, attempt - 1)) * random.uniform(0.5, 1.0)


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).

    None when the header is absent or unreadable; never negative.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())

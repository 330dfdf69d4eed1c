"""Reading the control API's JSON bodies: each field checked, or :class:`Invalid` naming it.

The control blueprint turns :class:`Invalid` into a 400 with BatchRouter's error envelope.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flask import request

from .state import ACTIVE_STATUSES, TERMINAL_STATUSES


class Invalid(Exception):
    """A control request's field is missing or wrong; `reason` says what it must be."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason


def json_object() -> dict[str, Any]:
    if not request.get_data():
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise Invalid("body", "must be a JSON object")
    return body


def integer(body: dict[str, Any], field: str, default: int | None, minimum: int = 0) -> int | None:
    value = body.get(field, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise Invalid(field, f"must be an integer >= {minimum}")
    return value


def boolean(body: dict[str, Any], field: str, default: bool) -> bool:
    value = body.get(field, default)
    if not isinstance(value, bool):
        raise Invalid(field, "must be true or false")
    return value


def choice(body: dict[str, Any], field: str, default: str, choices: Iterable[str]) -> str:
    value = body.get(field, default)
    choices = tuple(choices)
    if value not in choices:
        raise Invalid(field, "must be one of " + ", ".join(choices))
    return value


def batch_status(body: dict[str, Any], default: str) -> str:
    value = body.get("status", default)
    if value == "canceled":
        value = "cancelled"
    return choice({"status": value}, "status", default, ACTIVE_STATUSES + TERMINAL_STATUSES)

"""Queued faults, as they reach a response: a status that replaces it, or a body broken mid-stream.

Both the API and the artifact host take faults (`POST /_emulator/faults`), so they live here.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import cast

from flask import Response, request

from .instance import emulator
from .responses import access_denied, error
from .state import BODY_FAULTS, Fault

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


def faulty_body(
    chunks: Iterable[bytes], fault: Fault, sock: socket.socket | None, stall: Callable[[float], None]
) -> Iterator[bytes]:
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
        stall(fault.stall_seconds)
        if rest:
            yield rest
        yield from chunks
        return
    if fault.kind == "drop" and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def apply_body_fault(response: Response, fault: Fault | None) -> Response:
    """`response` with its body broken as `fault` says, when it is a body fault; else unchanged."""
    if fault is None or fault.kind not in BODY_FAULTS:
        return response
    # The emulator's streamed bodies are all bytes; Werkzeug types `response.response` as str or bytes.
    body = cast("Iterable[bytes]", response.response) if response.is_streamed else [response.get_data()]
    response.response = faulty_body(body, fault, request.environ.get("werkzeug.socket"), emulator().state.stall)
    return response

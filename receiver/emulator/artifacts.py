"""`/artifacts/...`: a presigned object-store URL, as the batch artifact links point at.

No auth: the HMAC and expiry in the query string are the whole check, as with S3, and a refusal is
S3's XML 403. Range requests get 206 unless the batch was created with ranges off.
"""

from __future__ import annotations

import hashlib

from flask import Blueprint, Response, request

from . import content
from .faults import apply_body_fault, status_fault_response
from .instance import emulator
from .responses import access_denied
from .state import Batch

artifacts = Blueprint("artifacts", __name__, url_prefix="/artifacts")


@artifacts.get("/<batch_id>/<name>")
def artifact(batch_id: str, name: str) -> Response:
    emu = emulator()
    # Counted before anything else: tests assert the receiver never sends its API key here.
    emu.state.count_artifact_request(batch_id, "Authorization" in request.headers)
    problem = emu.check_url(batch_id, name)
    if problem == "SignatureDoesNotMatch":
        return access_denied("The request signature we calculated does not match.", problem)
    if problem:
        return access_denied(problem)
    batch = emu.state.get_batch(batch_id)
    file = batch.artifact(name) if batch is not None else None
    if batch is None or file is None:
        return Response(
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
            "<Message>The specified key does not exist.</Message></Error>",
            status=404,
            content_type="application/xml",
        )
    fault = emu.state.take_fault("artifact", batch_id)
    if fault is not None:
        replaced = status_fault_response(fault)
        if replaced is not None:
            return replaced
    return apply_body_fault(serve_file(batch, file), fault)


def serve_file(batch: Batch, file: content.AnyArtifact) -> Response:
    """200 with the whole file, or 206 for one `Range` (unless the batch has ranges off)."""
    size = file.size
    etag = '"' + hashlib.sha1(f"{batch.id}/{file.name}/{size}".encode()).hexdigest() + '"'
    headers = {"ETag": etag}
    start, stop, status = 0, size, 200
    if batch.ranges:
        headers["Accept-Ranges"] = "bytes"
        wanted = request.range if "Range" in request.headers else None
        if_range = request.headers.get("If-Range")
        if wanted is not None and len(wanted.ranges) == 1 and if_range in (None, etag):
            span = wanted.range_for_length(size)
            if span is None:
                return Response(status=416, headers={"Content-Range": f"bytes */{size}", "Content-Length": "0"})
            start, stop = span
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    headers["Content-Length"] = str(stop - start)
    return Response(
        file.iter_bytes(start, stop),
        status=status,
        headers=headers,
        content_type=file.content_type,
        direct_passthrough=True,
    )

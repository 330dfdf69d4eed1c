"""A WSGI app that reports what gunicorn's hooks did to the worker process serving it, so that
tests can check `receiver.gunicorn_conf` under real gunicorn."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterable
from typing import Any


def create_app() -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = json.dumps({"frozen_objects": gc.get_freeze_count()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app

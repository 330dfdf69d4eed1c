"""The production gunicorn settings (receiver/gunicorn_conf.py), under real gunicorn."""

from __future__ import annotations

import sys
from pathlib import Path

import requests

from .conftest import Service, make_receiver_env, wait_http


def test_each_worker_freezes_what_it_loaded_at_start(tmp_path: Path) -> None:
    """Objects allocated while the app loads are moved out of the garbage collector's reach, so a
    full collection no longer walks them all (60-110 ms stalls under load; BENCHMARKS.md)."""
    env = make_receiver_env(tmp_path, "http://127.0.0.1:9")
    svc = Service(
        "web",
        [sys.executable, "-m", "gunicorn", "-c", "python:receiver.web.gunicorn_conf", "-w", "1", "tests._probe_app:create_app()"],
        env,
        tmp_path,
    ).start()
    try:
        url = f"http://127.0.0.1:{env['PORT']}"
        wait_http(f"{url}/", svc.proc)
        assert requests.get(url, timeout=10).json()["frozen_objects"] > 10_000
    finally:
        svc.stop()

"""gunicorn settings for the hook (the root `gunicorn.conf.py` imports this module).

Validated settings first: a bad value stops gunicorn with one line and exit code 2, before gunicorn
logs anything.

Worker class and counts: gthread, 2 processes x 8 threads, chosen from `bench/bench_ingest.py` on the
2-core machine (BENCHMARKS.md, "Ingest"; 64 keep-alive connections, durable deliveries/s against the
HMAC-only reference under the same settings, one run, 2026-11-27):

    gthread 2x8   1,142/s  p99  85 ms   (reference 2,242/s)   <- chosen
    gthread 4x8   1,085/s  p99 119 ms
    gthread 2x16    936/s  p99 149 ms
    gthread 2x32    880/s  p99 190 ms
    sync -w 2       921/s  p99 177 ms
    sync -w 4       914/s  p99 149 ms
    sync -w 8       796/s  p99 219 ms

Why: each delivery waits for an fsync (SQLite, synchronous=FULL) before its 200. With threads, the
deliveries that arrive during one commit share the next (the ledger's group commit), so one fsync
serves several; a sync worker commits one delivery per fsync and closes every connection (no
keep-alive). Two processes match the two cores; more threads than 8 or more processes only add GIL
and lock contention (lower throughput, higher p99). gthread also keeps a slow client from holding a
whole process, which a sync worker would.
"""

import logging
import os
import shutil
import socket
import struct
import sys
import tempfile

from receiver.config import Settings
from receiver.errors import ConfigError

try:
    _settings = Settings.from_env()
except ConfigError as _exc:
    print(f"receiver: configuration error: {_exc}", file=sys.stderr)
    sys.exit(2)

bind = f"0.0.0.0:{_settings.port}"
workers = 2
# gthread, with connection closes moved off the main loop (receiver/gunicorn_worker.py).
worker_class = "receiver.gunicorn_worker.ReceiverThreadWorker"
threads = 8
keepalive = 5
backlog = 2048
# Deliveries are answered in milliseconds; a worker stuck this long is restarted.
timeout = 30
graceful_timeout = 30
# The ingest handler enforces its own body limit with a JSON 413; keep gunicorn's header limits.
limit_request_line = 8190
# X-Forwarded-* is trusted by the app itself, and only from RECEIVER_TRUSTED_PROXIES hops
# (werkzeug's ProxyFix); gunicorn must not trust it on its own, or any client could claim https.
forwarded_allow_ips = ""
secure_scheme_headers: dict[str, str] = {}

# prometheus-client multiprocess mode: every worker writes its counters here, /metrics sums them.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="receiver-metrics-")


def when_ready(server):
    """Give every client socket a read deadline (SO_RCVTIMEO, inherited by accepted sockets).

    gunicorn's gthread worker reads a request's headers and body in blocking mode with no deadline,
    so a handful of clients that send part of a request and stall would hold every thread and the
    hook would stop answering (tests/test_reliability.py found it with 12 to 20). With a deadline on
    each read, a stalled client's thread is freed after RECEIVER_CLIENT_TIMEOUT_SECONDS. A proxy that
    buffers requests (infra/Caddyfile, nginx) is the first line; this holds without one.
    """
    seconds = _settings.client_timeout_seconds
    deadline = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
    for listener in server.LISTENERS:
        listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, deadline)
        listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, deadline)


class _StalledClientFilter(logging.Filter):
    """A read deadline that expires surfaces in gunicorn as EAGAIN and a logged traceback; it is a
    client's doing, so say it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BlockingIOError) and record.getMessage().startswith("Socket error"):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "client stalled past RECEIVER_CLIENT_TIMEOUT_SECONDS; connection closed", (), None, None
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def post_worker_init(worker):
    worker.log.error_log.addFilter(_StalledClientFilter())


def on_starting(server):  # noqa: ARG001
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".db"):
            os.unlink(path)


def child_exit(server, worker):  # noqa: ARG001
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):  # noqa: ARG001
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.basename(folder).startswith("receiver-metrics-"):
        shutil.rmtree(folder, ignore_errors=True)

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

import os
import shutil
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
worker_class = "gthread"
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

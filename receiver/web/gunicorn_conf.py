"""gunicorn settings for the hook (the root `gunicorn.conf.py` imports this module).

Validated settings first: a bad value stops gunicorn with one line and exit code 2, before gunicorn
logs anything.

Worker class and counts: gevent, 2 processes, the fastest of the worker classes and counts
measured with `bench/bench_ingest.py` on the 2-core machine (BENCHMARKS.md, "Ingest"). Each
delivery's 200 waits for an fsync; greenlets wait for it cheaply where OS threads fought over the
GIL, and one commit serves every delivery that arrived meanwhile (receiver/cooperative.py). Two
processes match the two cores. A stalled client holds a greenlet, not a thread (worker_connections
per process), and every read has a deadline (receiver/web/gunicorn_worker.py).
"""

import gc
import logging
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


def _prepare_ledger(settings: Settings) -> None:
    """Migrate the ledger once, before any worker starts, in a child process: the master must not
    import SQLAlchemy or psycopg, which gevent has to patch first (in each worker)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            from receiver.ledger import Ledger
            from receiver.web.app import prepare_ledger

            ledger = Ledger.from_settings(settings)
            prepare_ledger(ledger)
            ledger.close()
        except SystemExit as exc:
            code = int(exc.code or 0)
        except ConfigError as exc:  # e.g. postgresql:// with a psycopg that does not import
            print(f"receiver: configuration error: {exc}", file=sys.stderr)
            code = 2
        except BaseException:
            code = 1
            logging.getLogger("receiver").exception("preparing the ledger failed")
        finally:
            sys.stderr.flush()
            os._exit(code)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status:
        sys.exit(status)


_prepare_ledger(_settings)

# Every interface: on a platform (the Procfile's `web:`, a container) traffic arrives from outside
# the process's host or network namespace. `receiver serve --emulator` passes --bind 127.0.0.1.
bind = f"0.0.0.0:{_settings.port}"
# A control socket per gunicorn (named for its master's pid), not gunicorn's default shared
# ~/.gunicorn/gunicorn.ctl, which a second gunicorn on the host would take over. `gunicornc -s PATH`.
control_socket = os.path.join(tempfile.gettempdir(), f"receiver-gunicorn-{os.getpid()}.ctl")
workers = 2
# gevent, with a read deadline on every client socket (receiver/web/gunicorn_worker.py).
worker_class = "receiver.web.gunicorn_worker.ReceiverGeventWorker"
# Open connections per process, idle keep-alive ones and stalled clients included; each costs a
# greenlet and a file descriptor, not a thread.
worker_connections = 1000
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


class _StalledClientFilter(logging.Filter):
    """A read deadline that expires (receiver/web/gunicorn_worker.py) surfaces in gunicorn as a logged
    traceback; it is a client's doing, so say it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TimeoutError) and record.getMessage().startswith("Socket error"):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "client stalled past RECEIVER_CLIENT_TIMEOUT_SECONDS; connection closed",
                (),
                None,
                None,
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def post_worker_init(worker):
    worker.log.error_log.addFilter(_StalledClientFilter())
    # The app is loaded: move what it allocated out of the collector's reach, so a full collection
    # no longer stalls requests walking it (BENCHMARKS.md, "Ingest"). None of it is ever garbage.
    gc.collect()
    gc.freeze()


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

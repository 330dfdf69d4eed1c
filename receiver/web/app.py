"""`create_app()`: settings first, then the ledger, the hook, health and metrics.

gunicorn imports this factory (Procfile `web: gunicorn 'receiver.app:create_app()'`), each worker
builds its own app and its own ledger connections; nothing is shared in process memory.
"""

from __future__ import annotations

import logging
import sys
from functools import cache, partial
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from .. import metrics
from ..config import Settings
from ..cooperative import blocking_runner
from ..errors import ConfigError, LedgerUnavailable, ReceiverError, SchemaOutdated, SecretUnreadable, StorageError
from ..ledger import Ledger, reports
from ..logs import configure_logging
from ..storage import open_storage
from .hook import bp as ingest_bp

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, test_config: dict[str, Any] | None = None) -> Flask:
    if settings is None:
        try:
            settings = Settings.from_env()
        except ConfigError as exc:
            # A bad setting under gunicorn: one line, exit 2, no traceback (docs/architecture.md,
            # "Behaviour operators rely on").
            print(f"receiver: configuration error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    configure_logging(log_format=settings.log_format)

    app = Flask(__name__)
    app.config["RECEIVER_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = None  # ingest enforces its own limit with a JSON 413
    if test_config:
        app.config.update(test_config)

    ledger = Ledger.from_settings(settings, run_blocking=blocking_runner())
    prepare_ledger(ledger)
    app.extensions["receiver.ledger"] = ledger
    app.extensions["receiver.storage"] = open_storage(settings)

    if settings.web.trusted_proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = settings.web.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n)  # type: ignore[method-assign]

    app.register_blueprint(ingest_bp)
    if settings.web.admin_token:
        from .admin import bp as admin_bp

        app.register_blueprint(admin_bp)  # without a token /admin stays a 404 (README, "The status page")
    _register_health(app, ledger)
    _register_errors(app)
    return app


def prepare_ledger(ledger: Ledger) -> None:
    """Migrate (or refuse an older schema) and prove the key opens the stored secrets.

    Under gunicorn the master does this once before forking (web/gunicorn_conf.py), so the one line
    and exit code 2 stop gunicorn itself; each worker then finds the schema current.
    """
    try:
        ledger.create_schema()
        ledger.check_secrets()
    except (SchemaOutdated, SecretUnreadable) as exc:
        print(f"receiver: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except LedgerUnavailable as exc:
        # Start anyway: deliveries get 503 (BatchRouter retries) and /readyz says why.
        log.error("ledger not ready at start-up: %s", exc)


def _register_health(app: Flask, ledger: Ledger) -> None:
    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    def checks() -> dict[str, str]:
        found: dict[str, str] = {}
        try:
            ledger.ping()
            found["ledger"] = "ok"
        except ReceiverError as exc:
            found["ledger"] = str(exc)
        try:
            app.extensions["receiver.storage"].check()
            found["storage"] = "ok"
        except StorageError as exc:
            found["storage"] = str(exc)
        return found

    app.extensions["receiver.readiness"] = checks  # the status page shows the same checks

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        found = checks()
        ready = all(v == "ok" for v in found.values())
        return jsonify(status="ready" if ready else "unavailable", checks=found), 200 if ready else 503

    @app.get("/metrics")
    def prometheus() -> Response:
        # One read of the ledger for both collectors (counters and bounded queries, off the event
        # loop on SQLite: Ledger.read); cached for this scrape only.
        scraped = cache(partial(reports.scrape, ledger))
        return Response(
            metrics.render(lambda: scraped()["stats"], lambda: scraped()["figures"], checks),
            mimetype="text/plain; version=0.0.4; charset=utf-8",
        )


def _register_errors(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        code = exc.code or 500
        return jsonify(error={"code": (exc.name or "error").lower().replace(" ", "_"), "message": exc.description}), code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        # Logged with its traceback for the operator; the client gets no internals.
        log.exception("unhandled error")
        return jsonify(error={"code": "internal_error", "message": "internal error; the delivery was not recorded"}), 500

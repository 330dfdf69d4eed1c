"""The emulator's Flask app: BatchRouter's API, a signed-URL artifact host, and a control API.

Three surfaces, three blueprints:

* `/v1/...` (`api.py`) imitates the BatchRouter endpoints the receiver calls, bearer key required,
  including the response variants the public material disagrees on (docs/batchrouter-api.md,
  "Batch status") so the receiver is tested against all of them;
* `/artifacts/...` (`artifacts.py`) imitates a presigned object-store URL: no auth, an HMAC in the
  query string, an expiry, Range support, S3-like 403s;
* `/_emulator/...` (`control.py`) lets tests and developers create batches, complete them (which
  sends the webhook), queue faults and read counters. It has no auth: the emulator is a development
  tool.

The state they share lives in `instance.py`; error envelopes and batch views in `responses.py`.
"""

from __future__ import annotations

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from .api import api
from .artifacts import artifacts
from .control import control
from .instance import DEFAULT_API_KEY, Emulator, EmulatorConfig
from .responses import error

__all__ = ["DEFAULT_API_KEY", "Emulator", "EmulatorConfig", "create_app"]


def create_app(config: EmulatorConfig | None = None) -> Flask:
    """Build an emulator app; each app has its own state, so tests can run several side by side."""
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["emulator"] = Emulator(config or EmulatorConfig())
    app.register_blueprint(api)
    app.register_blueprint(artifacts)
    app.register_blueprint(control)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.code or 500, "internal_error")
        return error(exc.code or 500, code, exc.description or exc.name)

    return app

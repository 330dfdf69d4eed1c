"""The ingest benchmark's reference: the least a correct hook must do, and nothing durable.

One Flask route that reads the raw body, checks the HMAC against the configured secrets (the same
`receiver.signature.verify` the receiver uses) and answers 200 JSON; nothing is parsed or recorded.
Served by gunicorn with the receiver's own settings, it is the ceiling the receiver is measured
against (docs/benchmarking.md, "Ingest").
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request

from receiver.signature import HEADER, verify


def create_app() -> Flask:
    secrets = tuple(s.strip() for s in os.environ.get("RECEIVER_WEBHOOK_SECRET", "").split(",") if s.strip())
    app = Flask(__name__)

    @app.post("/hooks/batchrouter")
    def hook():
        raw = request.get_data()
        try:
            verify(request.headers.get(HEADER), raw, secrets)
        except Exception:
            return jsonify(error="invalid_signature"), 401
        return jsonify(status="ok"), 200

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    return app

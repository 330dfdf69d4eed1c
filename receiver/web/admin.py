"""The status page at `/admin`: what an operator needs to see and do without a shell.

Registered only when RECEIVER_ADMIN_TOKEN is set (otherwise `/admin` is a plain 404). Every request
authenticates (HTTP Basic with the token as password, or a bearer token), compared in constant
time; there are no sessions. Every POST carries a CSRF token: a browser resends Basic credentials to
any site's form, so the token (an HMAC only this server can make, readable only by a page of this
origin) is what proves the form came from here. Pages are server-rendered, script-free, and sent
with a strict Content-Security-Policy, `X-Frame-Options: DENY` and no caching.

What this page shows is read through ledger/reports.py; it never shows a webhook secret, the API key
or a presigned URL (errors pass through logs.redact, the manifest's raw batch is not shown).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, redirect, render_template, request, send_from_directory, url_for
from werkzeug.exceptions import NotFound

from .. import metrics
from ..config import NOTIFY_TARGETS, Settings
from ..errors import LedgerUnavailable, ReceiverError
from ..layout import validate_batch_id
from ..ledger import DEAD, JOB_STATES, Ledger, reports
from ..logs import redact
from ..manifest import read_manifest

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates")

#: Jobs per page of /admin/jobs; older ones are a link away (?before=…), each page an index walk.
JOBS_PER_PAGE = 200

#: How long a page's CSRF token stays valid: a form left open over lunch still works.
CSRF_MAX_AGE = 12 * 3600

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# --- authentication, CSRF, headers ------------------------------------------------------------------


@bp.before_request
def authenticate() -> Response | None:
    user = _authenticated_user(_settings().web.admin_token or "")
    if user is None:
        return Response("authentication required\n", 401, {"WWW-Authenticate": 'Basic realm="receiver admin", charset="UTF-8"'})
    request.environ["receiver.admin_user"] = user
    if request.method == "POST" and not _valid_csrf(request.form.get("csrf_token", "")):
        log.warning("admin: %s refused: missing or invalid CSRF token", _who())
        return Response("missing or invalid CSRF token; reload the page and try again\n", 403, mimetype="text/plain")
    return None


@bp.after_request
def security_headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _authenticated_user(token: str) -> str | None:
    """The user name (Basic) or "bearer", when the request carries the token; else None."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    expected = token.encode()
    if scheme.lower() == "bearer":
        return "bearer" if hmac.compare_digest(value.strip().encode(), expected) else None
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return (user or "admin") if hmac.compare_digest(password.encode(), expected) else None
    return None


def _csrf_key() -> bytes:
    # Derived from the admin token: every gunicorn worker (and host) agrees, no state to share.
    return hashlib.sha256(b"receiver-admin-csrf\0" + (_settings().web.admin_token or "").encode()).digest()


def csrf_token(now: float | None = None) -> str:
    issued = str(int(time.time() if now is None else now))
    return f"{issued}.{hmac.new(_csrf_key(), issued.encode(), hashlib.sha256).hexdigest()}"


def _valid_csrf(token: str, now: float | None = None) -> bool:
    issued, _, mac = token.partition(".")
    if not issued.isdigit():
        return False
    expected = hmac.new(_csrf_key(), issued.encode(), hashlib.sha256).hexdigest()
    age = (time.time() if now is None else now) - int(issued)
    return hmac.compare_digest(mac.encode(), expected.encode()) and -60 <= age <= CSRF_MAX_AGE


# --- pages ---------------------------------------------------------------------------------------------


@bp.get("", strict_slashes=False)
def overview() -> str:
    ledger = _ledger()
    try:
        figures: dict[str, Any] | None = reports.overview(ledger)
        error = None
    except LedgerUnavailable as exc:
        figures, error = None, str(exc)
    return _render(
        "admin/overview.html",
        figures=figures,
        error=error,
        readiness=current_app.extensions["receiver.readiness"](),
        signature_failures=metrics.signature_failures(),
        polling=figures["polling"] if figures else None,
        notifications=figures["notifications"] if figures else None,
        dead_jobs=reports.find_jobs(ledger, state=DEAD, limit=20) if figures and figures["dead"] else [],
    )


@bp.get("/jobs")
def jobs() -> str:
    state = request.args.get("state") or None
    if state not in (None, *JOB_STATES):
        state = None
    search = (request.args.get("q") or "").strip()[:255] or None
    before = _page_mark(request.args.get("before"))
    found = reports.find_jobs(_ledger(), state=state, search=search, limit=JOBS_PER_PAGE + 1, before=before)
    older = None
    if len(found) > JOBS_PER_PAGE:
        found = found[:JOBS_PER_PAGE]
        older = f"{found[-1]['updated_at']!r}:{found[-1]['batch_id']}"
    return _render(
        "admin/jobs.html",
        jobs=found,
        state=state,
        search=search or "",
        states=JOB_STATES,
        older=older,
        paged=before is not None,
        search_window=reports.SEARCH_WINDOW,
    )


def _page_mark(text: str | None) -> tuple[float, str] | None:
    """`?before=<updated_at>:<batch_id>`, the last row of the previous page (None when absent or bad)."""
    when, _, batch_id = (text or "").partition(":")
    try:
        return (float(when), batch_id) if batch_id else None
    except ValueError:
        return None


@bp.get("/jobs/<path:batch_id>")
def job(batch_id: str) -> str:
    detail = reports.job_detail(_ledger(), batch_id)
    if detail is None:
        raise NotFound(f"no job for batch {batch_id}")
    return _render(
        "admin/job.html",
        job=detail["job"],
        events=detail["events"],
        attempts=detail["attempts"],
        manifest=_manifest(batch_id) if detail["job"].get("manifest_key") else None,
        location=_location(detail["job"].get("manifest_key")),
        notifications=_ledger().notification_deliveries(batch_id),
    )


@bp.post("/jobs/<path:batch_id>/retry")
def retry(batch_id: str) -> Response:
    """Queue a dead job again (as `receiver fetch` does), noting who asked and when."""
    ledger = _ledger()
    found = ledger.job(batch_id)
    if found is None:
        raise NotFound(f"no job for batch {batch_id}")
    if found["state"] != DEAD:
        return redirect(url_for("admin.job", batch_id=batch_id, done="not-dead"), 303)  # type: ignore[return-value]
    ledger.enqueue(batch_id, origin="admin")
    log.info(
        "admin: %s retried dead batch %s from %s",
        _who(),
        batch_id,
        request.remote_addr,
        extra={"batch_id": batch_id, "outcome": "retried"},
    )
    return redirect(url_for("admin.job", batch_id=batch_id, done="retried"), 303)  # type: ignore[return-value]


@bp.post("/watch")
def watch() -> Response:
    """Make a batch id known so the polling fallback stores it even if no delivery ever names it,
    through the ledger's `watch` as `receiver watch` does. The web side makes no API calls, so
    where the command checks the batch first, this asks the worker's poller to check it at once:
    an ended batch is queued within a poll tick, and one BatchRouter does not know shows as not
    found."""
    batch_id = (request.form.get("batch_id") or "").strip()
    try:
        validate_batch_id(batch_id)
    except ReceiverError:
        return redirect(url_for("admin.overview", done="bad-batch-id"), 303)  # type: ignore[return-value]
    _ledger().watch(batch_id, poll_now=True)
    log.info(
        "admin: %s watched batch %s from %s",
        _who(),
        batch_id,
        request.remote_addr,
        extra={"batch_id": batch_id, "outcome": "watched"},
    )
    return redirect(url_for("admin.overview", done="watched"), 303)  # type: ignore[return-value]


@bp.post("/jobs/<path:batch_id>/replay")
def replay(batch_id: str) -> Response:
    """Send a batch's `batch.stored` event again, with the same webhook-id (as `receiver notify --replay`),
    to the target the form names, or to every target that had it."""
    target = request.form.get("target") or None
    if target is not None and target not in NOTIFY_TARGETS:
        raise NotFound(f"no notification target {target!r}")
    # An event past RECEIVER_NOTIFICATION_RETENTION_DAYS has no body left: rebuilt from the manifest.
    manifest = functools.partial(read_manifest, current_app.extensions["receiver.storage"], batch_id)
    if not _ledger().replay_notification(batch_id, None if target is None else (target,), manifest=manifest):
        raise NotFound(f"no notification for batch {batch_id}")
    log.info(
        "admin: %s replayed the notification of batch %s%s from %s",
        _who(),
        batch_id,
        f" to {target}" if target else "",
        request.remote_addr,
        extra={"batch_id": batch_id, "outcome": "replayed"},
    )
    return redirect(url_for("admin.job", batch_id=batch_id, done="replayed"), 303)  # type: ignore[return-value]


@bp.get("/style.css")
def style() -> Response:
    return send_from_directory(TEMPLATES / "admin", "style.css", mimetype="text/css")


# --- helpers -------------------------------------------------------------------------------------------


def _settings() -> Settings:
    return current_app.config["RECEIVER_SETTINGS"]


def _ledger() -> Ledger:
    return current_app.extensions["receiver.ledger"]


def _who() -> str:
    return str(request.environ.get("receiver.admin_user", "?"))


def _render(template: str, **context: Any) -> str:
    return render_template(
        template, csrf_token=csrf_token(), user=_who(), now=time.time(), done=request.args.get("done"), **context
    )


def _manifest(batch_id: str) -> dict[str, Any]:
    """The manifest's operator-facing fields (never its raw `batch`, which may hold URLs)."""
    try:
        found = read_manifest(current_app.extensions["receiver.storage"], batch_id)
    except (ReceiverError, ValueError) as exc:
        return {"error": redact(str(exc))}
    if found is None:  # the ledger says stored, storage has no manifest: say so
        return {"error": f"no manifest for batch {batch_id} in storage"}
    manifest = found.to_dict()
    files = [{k: f.get(k) for k in ("key", "bytes", "lines", "sha256")} for f in manifest.get("files", [])]
    fields = ("status", "stored_at", "source", "expected_items", "counts_match")
    return {"files": files, **{k: manifest.get(k) for k in fields}}


def _location(key: str | None) -> str | None:
    if not key:
        return None
    root = _settings().storage_url.rstrip("/")
    return redact(f"{root}/{key}")


@bp.app_template_filter("age")
def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, float(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


@bp.app_template_filter("when")
def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


@bp.app_template_filter("redact")
def _redact(text: str | None) -> str:
    return redact(text or "")

"""Commands an operator runs against the ledger and storage: `fetch`, `ls`, `cat`, `status`."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import sys
import textwrap
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from .. import layout
from ..config import NOTIFY_TARGETS
from ..errors import ConfigError, ReceiverError
from ..manifest import read_manifest, stored_batch_ids
from ._common import UNENCRYPTED, ConfigurationError, Failure, iso, load_settings, open_ledger, validate_batch_ids

if TYPE_CHECKING:
    from ..jobs.worker import Worker


@click.command()
@click.argument("batch_ids", nargs=-1, required=True)
def fetch(batch_ids: tuple[str, ...]) -> None:
    """Fetch and store these batches now, in the foreground (backfill). Idempotent.

    Exits 0 once every manifest exists, 1 if a batch cannot be stored (BatchRouter does not know it,
    or it failed for good; the reason is printed).
    """
    settings = load_settings()
    validate_batch_ids(batch_ids)
    from ..jobs.worker import Worker
    from ..logs import configure_logging

    configure_logging(logging.WARNING)
    ledger = open_ledger(settings)
    try:
        runner = Worker.from_settings(settings, ledger)
    except ConfigError as exc:
        raise ConfigurationError(str(exc)) from None
    failed = [b for b in batch_ids if not _fetch_one(runner, b)]
    if failed:
        raise Failure(f"{len(failed)} of {len(batch_ids)} batches not stored: {', '.join(failed)}")


def _fetch_one(runner: Worker, batch_id: str) -> bool:
    from ..ledger import STORED

    with _progress(batch_id) as progress:
        row = runner.run_batch(batch_id, progress)
    if row is None:
        click.echo(f"{batch_id}: BatchRouter does not know this batch (404)", err=True)
        return False
    if row["state"] == STORED:
        click.echo(f"{batch_id}: stored ({row['batch_status']}) {row['manifest_key']}")
        return True
    click.echo(f"{batch_id}: failed: {row['last_error']}", err=True)
    return False


class _progress:
    """A progress bar for a long transfer, only when stdout is a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def __enter__(self) -> Callable[[int, int | None], None] | None:
        if not sys.stdout.isatty():
            return None
        return self.update

    def update(self, done: int, total: int | None) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total or 0, label=self.label, show_pos=True).__enter__()
            self.seen = 0
        self.bar.update(done - self.seen)
        self.seen = done

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


#: How many batches `receiver ls` shows without --limit or --all: the recent ones a person reads.
LS_DEFAULT_LIMIT = 50
#: What a batch that ended without results is called in `ls` (its job is `stored`: it has a manifest).
_ENDED_WITHOUT_RESULTS = {"failed": "failed", "cancelled": "cancelled", "canceled": "cancelled", "expired": "expired"}


@click.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=LS_DEFAULT_LIMIT,
    show_default=True,
    help="Show the N most recently changed batches.",
)
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"]),
    help="Only batches changed on or after DATE (UTC), e.g. 2026-12-01.",
)
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Every batch: the whole ledger and every manifest in storage, however long that takes.",
)
def list_batches(as_json: bool, limit: int, since: dt.datetime | None, show_all: bool) -> None:
    """Batches and jobs with their status, the most recently changed first.

    By default the 50 most recent (--limit N for another number); --all lists every one, including
    batches whose manifest is in storage but whose job this ledger no longer holds.
    """
    settings = load_settings()
    ledger = open_ledger(settings, create=False)
    bound = None if show_all else limit
    after = None if since is None else since.replace(tzinfo=dt.UTC).timestamp()
    rows = {row["batch_id"]: _public_job(row) for row in ledger.list_jobs(limit=bound, since=after)}
    # Watched, or BatchRouter did not know them (polling stopped): they have no job yet.
    for known in ledger.known(limit=bound, since=after):
        rows.setdefault(
            known["batch_id"],
            {
                "batch_id": known["batch_id"],
                "state": known["state"],
                "batch_status": known["last_status"],
                "updated_at": iso(known["first_seen_at"]),
            },
        )
    if show_all:
        _add_stored_without_job(settings, rows)
    listed = sorted(rows.values(), key=lambda r: r.get("updated_at") or "", reverse=True)
    listed = listed[:bound]
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    if not listed:
        click.echo("no batches yet" if since is None else f"no batch changed since {since:%Y-%m-%d %H:%M:%S} UTC")
        return
    _echo_table(listed)
    if len(listed) == bound:
        click.echo(f"(the {len(listed)} most recent; --limit N shows more, --all every one)", err=True)


def _add_stored_without_job(settings: Any, rows: dict[str, dict[str, Any]]) -> None:
    """Every manifest in storage whose batch has no row yet (`ls --all` only: it lists the whole tree)."""
    from ..storage import open_storage

    storage = open_storage(settings)
    try:
        for batch_id in stored_batch_ids(storage):
            if batch_id not in rows:
                rows[batch_id] = {"batch_id": batch_id, "state": "stored", "manifest_key": layout.manifest_key(batch_id)}
    except ReceiverError as exc:
        click.echo(f"receiver: storage not listed: {exc}", err=True)


def _echo_table(rows: list[dict[str, Any]]) -> None:
    click.echo(f"{'BATCH':<32} {'STATE':<9} {'STATUS':<10} {'BYTES':>12} {'LINES':>9} STORED AT")
    width = max(60, shutil.get_terminal_size().columns)
    for row in rows:
        click.echo(
            f"{row['batch_id']:<32} {row['state']:<9} {row.get('batch_status') or '-':<10} "
            f"{row.get('bytes') if row.get('bytes') is not None else '-':>12} {row.get('lines') if row.get('lines') is not None else '-':>9} "
            f"{row.get('stored_at') or '-':<20}".rstrip()
        )
        note = row.get("last_error") or ("counts mismatch" if row.get("counts_match") is False else "")
        if note:  # whole, on lines of its own: a failure reason cut short is no use
            click.echo(
                textwrap.fill(
                    note,
                    width,
                    initial_indent="  note: ",
                    subsequent_indent="        ",
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            )


def _public_job(row: dict[str, Any]) -> dict[str, Any]:
    out = {
        k: row[k]
        for k in (
            "batch_id",
            "state",
            "attempts",
            "batch_status",
            "manifest_key",
            "bytes",
            "lines",
            "expected_items",
            "counts_match",
            "last_error",
        )
    }
    out["stored_at"] = iso(row["stored_at"])
    out["updated_at"] = iso(row["updated_at"])
    # A batch that ended without results has a manifest (its job is `stored`) and no bytes: call
    # it what it is. `job_state` keeps the job's own word for scripts.
    out["job_state"] = row["state"]
    if row["state"] == "stored":
        out["state"] = _ENDED_WITHOUT_RESULTS.get(str(row["batch_status"]).lower(), "stored")
    return out


@click.command()
@click.argument("batch_id")
def cat(batch_id: str) -> None:
    """Stream a stored batch's results to stdout (exit 1 if it is not stored)."""
    settings = load_settings()
    validate_batch_ids((batch_id,))
    from ..storage import open_storage

    storage = open_storage(settings)
    try:
        manifest = read_manifest(storage, batch_id)
    except ReceiverError as exc:
        raise Failure(str(exc)) from None
    if manifest is None:
        raise Failure(_not_stored(settings, batch_id))
    results = manifest.results
    if results is None:
        raise Failure(f"batch {batch_id} is stored with status {manifest.status!r} and has no results")
    out = click.get_binary_stream("stdout")
    try:
        for block in storage.open_read(results.key):
            out.write(block)
        out.flush()
    except BrokenPipeError:  # `receiver cat X | head` is fine
        sys.stderr.close()
    except ReceiverError as exc:
        raise Failure(str(exc)) from None


def _not_stored(settings: Any, batch_id: str) -> str:
    """Why a batch has no manifest, from its job in the ledger: dead (and why), under way, or unknown."""
    from ..ledger import DEAD

    row = open_ledger(settings, create=False).job(batch_id)
    if row is None:
        return (
            f"batch {batch_id} is not stored: this receiver has not heard of it (no delivery, fetch or watch named it; "
            "a `receiver fetch` that answered 404 leaves nothing behind: BatchRouter does not know that id under this API key)"
        )
    if row["state"] == DEAD:
        return (
            f"batch {batch_id} is dead after {row['attempts']} attempts, not stored: {row['last_error']}"
            f" (`receiver fetch {batch_id}` tries again)"
        )
    retrying = f", last error: {row['last_error']}" if row["last_error"] else ""
    return f"batch {batch_id} is not stored yet ({row['state']}, {row['attempts']} attempts so far{retrying})"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
def status(as_json: bool) -> None:
    """Queue depth, retries, failures, count mismatches, the last delivery and the accepted secrets."""
    settings = load_settings()
    ledger = open_ledger(settings, create=False)
    now = time.time()
    stats = ledger.stats(now)
    secrets = ledger.secret_info(now)
    stats["secrets"] = {
        "stored": [
            {
                "age_seconds": round(now - s.created_at),
                "expires_in_seconds": None if s.expires_at is None else round(s.expires_at - now),
            }
            for s in secrets
        ],
        "from_environment": len(settings.web.webhook_secrets),
        "encrypted": bool(settings.encryption_keys),
    }
    stats["polling"] = {"interval_seconds": settings.worker.poll_seconds, **ledger.polling_stats(now)}
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    jobs = stats["jobs"]
    click.echo(
        f"queue depth: {stats['queue_depth']} (queued {jobs['queued']}, retrying {stats['retrying']}, running {jobs['running']})"
    )
    click.echo(f"stored: {jobs['stored']}  dead: {jobs['dead']}  count mismatches: {stats['counts_mismatch']}")
    last = stats["last_delivery"]
    click.echo(
        "last delivery: " + (f"{iso(last['received_at'])} {last['event_type']} {last['batch_id'] or ''}" if last else "none yet")
    )
    total = len(secrets) + len(settings.web.webhook_secrets)
    click.echo(
        f"accepted webhook secrets: {total}" + ("  (every delivery gets 401 until `receiver register`)" if not total else "")
    )
    for s in stats["secrets"]["stored"]:
        expiry = (
            "current"
            if s["expires_in_seconds"] is None
            else f"retiring in {s['expires_in_seconds'] // 3600}h{s['expires_in_seconds'] % 3600 // 60:02d}m"
        )
        click.echo(f"  stored secret, age {s['age_seconds'] // 3600}h{s['age_seconds'] % 3600 // 60:02d}m, {expiry}")
    if settings.web.webhook_secrets:
        click.echo(f"  {len(settings.web.webhook_secrets)} from RECEIVER_WEBHOOK_SECRET")
    if not settings.encryption_keys:
        click.echo(f"  {UNENCRYPTED}")
    for row in stats["dead"]:
        click.echo(f"dead: {row['batch_id']} after {row['attempts']} attempts: {row['last_error']}")
    notes = stats["notifications"]
    if settings.notify.targets or any(notes["states"].values()):
        oldest = notes["oldest_pending_at"]
        click.echo(
            f"notifications: pending {notes['states']['pending']}  sent {notes['states']['sent']}  "
            f"failed {notes['states']['failed']}" + (f"  (oldest pending since {iso(oldest)})" if oldest else "")
        )
        for target in sorted(set(settings.notify.targets) | set(notes["targets"]), key=_target_order):
            counts = notes["targets"].get(target, {"pending": 0, "sent": 0, "failed": 0})
            unset = "" if target in settings.notify.targets else "  (not set any more)"
            click.echo(f"  {target}: pending {counts['pending']}  sent {counts['sent']}  failed {counts['failed']}{unset}")
    for row in notes["failed"]:
        click.echo(
            f"notification failed: {row['batch_id']} to {row['target']} ({row['webhook_id']}) "
            f"after {row['attempts']} attempts: {row['last_error']}"
        )
    _echo_polling(stats["polling"])


def _target_order(target: str) -> tuple[int, str]:
    return (NOTIFY_TARGETS.index(target) if target in NOTIFY_TARGETS else len(NOTIFY_TARGETS), target)


def _echo_polling(polling: dict[str, Any]) -> None:
    """The polling fallback's lines of `status`, and the warning that deliveries are being refused."""
    age = polling["oldest_watched_age_seconds"]
    click.echo(
        f"watched batches: {polling['watched']}"
        + (f" (oldest {polling['oldest_watched']}, {age // 3600}h{age % 3600 // 60:02d}m)" if age is not None else "")
        + (f"  not found by BatchRouter: {polling['not_found']}" if polling["not_found"] else "")
    )
    every = f"every {polling['interval_seconds']}s" if polling["interval_seconds"] else "off (RECEIVER_POLL_SECONDS=0)"
    click.echo(f"polling: {every}, {polling['polls']} polls made, {polling['found_by_poll']} batches found by polling")
    click.echo(f"deliveries refused for a bad signature (24h): {polling['refused_signature_24h']}")
    if polling["refused_signature_24h"]:
        click.echo(
            "warning: deliveries were refused for a bad signature in the last 24 hours; check the webhook secret "
            "(`receiver register --rotate`) and watch the batches sent meanwhile (`receiver watch`)"
        )

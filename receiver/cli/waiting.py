"""`receiver wait BATCH_ID… [--timeout S]`: block a shell step until batches have manifests.

The manifest in storage is the truth (the commit marker downstream jobs read); the ledger, when this
host can read it, adds what storage cannot say: a job that is dead will never write one. A host with
read access to the bucket and no ledger waits on storage alone.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import click

from ..errors import ReceiverError
from ._common import ConfigurationError, Failure, ledger_file_missing, load_settings, validate_batch_ids

if TYPE_CHECKING:
    from ..config import Settings
    from ..ledger import Ledger
    from ..storage import Storage

#: (settled, line): settled is True (stored with results), False (never will be) or None (waiting).
Outcome = tuple[bool | None, str]


@click.command()
@click.argument("batch_ids", nargs=-1, required=True)
@click.option(
    "--timeout", type=click.FloatRange(min=0), default=None, help="Give up after S seconds (exit 1). Default: wait for ever."
)
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds between checks.")
def wait(batch_ids: tuple[str, ...], timeout: float | None, interval: float) -> None:
    """Block until each batch has a manifest, printing one line per batch as it settles.

    Exits 0 when every batch is stored with results; 1 when one ended without results (failed,
    cancelled, expired), is dead in the ledger, or the timeout passed.
    """
    validate_batch_ids(batch_ids)
    settings = load_settings()
    from ..storage import open_storage

    storage = open_storage(settings)
    ledger = _ledger_if_readable(settings)
    root = getattr(storage, "root", None)  # a local folder (S3 has no such thing to be missing)
    if ledger is None and root is not None and not os.path.isdir(root):
        # Nothing to wait on here: it would wait for ever. Most likely the wrong folder.
        raise ConfigurationError(
            f"no storage at {root} and no ledger at {ledger_file_missing(settings) or settings.database_url}: "
            "run this where `receiver serve` runs, or set RECEIVER_STORAGE_URL (after `receiver serve --emulator`, "
            "in its folder: set -a; . receiver-data/emulator.env; set +a)"
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting = list(dict.fromkeys(batch_ids))
    bad: list[str] = []
    while True:
        still = []
        for batch_id in waiting:
            settled, line = _check(batch_id, storage, ledger)
            if settled is None:
                still.append((batch_id, line))
                continue
            click.echo(f"{batch_id}: {line}")
            if not settled:
                bad.append(batch_id)
        waiting = [batch_id for batch_id, _ in still]
        if not waiting:
            break
        if deadline is not None and time.monotonic() >= deadline:
            for batch_id, line in still:
                click.echo(f"{batch_id}: timed out after {timeout:g}s: {line}")
            bad += waiting
            break
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
    if bad:
        raise Failure(f"{len(bad)} of {len(set(batch_ids))} batches without results: {', '.join(bad)}")


def _check(batch_id: str, storage: Storage, ledger: Ledger | None) -> Outcome:
    from ..ledger import DEAD
    from ..manifest import read_manifest

    row = _job(ledger, batch_id)
    if row is not None and row["state"] == DEAD:
        return False, f"dead after {row['attempts']} attempts: {row['last_error']}"
    try:
        manifest = read_manifest(storage, batch_id)
    except ReceiverError as exc:
        return None, f"storage not readable: {exc}"
    if manifest is None:
        return None, _pending(row, ledger)
    results = manifest.results
    if results is None:
        return False, f"ended {manifest.status} without results"
    return True, f"stored ({manifest.status}), {results.lines} lines: {results.key}"


def _pending(row: dict[str, Any] | None, ledger: Ledger | None) -> str:
    if ledger is None:
        return "no manifest yet"
    if row is None:
        return "no manifest yet; not known to this receiver's ledger"
    note = f" (last error: {row['last_error']})" if row.get("last_error") else ""
    return f"no manifest yet; job {row['state']}{note}"


def _job(ledger: Ledger | None, batch_id: str) -> dict[str, Any] | None:
    if ledger is None:
        return None
    try:
        return ledger.job(batch_id)
    except ReceiverError:  # down for a moment: storage alone answers this round
        return None


def _ledger_if_readable(settings: Settings) -> Ledger | None:
    """The ledger when this host has one; never creates one (a waiting host may have only storage)."""
    from ..ledger import Ledger
    from ..ledger.engine import sqlite_path

    path = sqlite_path(settings.database_url)
    if path is not None and not os.path.isfile(path):
        return None
    try:
        ledger = Ledger(settings.database_url)
        ledger.job("-")
    except ReceiverError:
        return None
    return ledger

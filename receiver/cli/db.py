"""`receiver db`: the ledger's schema version, the key its webhook secrets are sealed with, its
size, and pruning what is past its retention."""

from __future__ import annotations

import dataclasses
import json
import time

import click

from ..errors import ReceiverError, SchemaOutdated, SecretUnreadable
from ._common import ConfigurationError, Failure, load_settings, open_ledger

#: Seconds between two prune steps of `db prune`: writers (ingest, the worker) take the lock between.
PRUNE_PAUSE_SECONDS = 0.02


@click.group()
def db() -> None:
    """The ledger's schema (migrations), its encrypted secrets, its size and retention."""


@db.command()
def upgrade() -> None:
    """Bring the ledger's schema up to date (the Procfile's `release:` step), whatever RECEIVER_AUTO_MIGRATE says.

    Safe to run while other processes run or start: migrations take a lock and commit whole.
    """
    from ..ledger import Ledger
    from ..ledger.migrate import head

    settings = dataclasses.replace(load_settings(), auto_migrate=True)
    ledger = Ledger.from_settings(settings)
    try:
        found = ledger.create_schema()
    except ReceiverError as exc:
        raise Failure(str(exc)) from None
    finally:
        ledger.close()
    if found == head():
        click.echo(f"receiver: the ledger's schema is current ({head()})")
    else:
        click.echo(f"receiver: the ledger's schema was upgraded from {found or 'none'} to {head()}")


@db.command()
def current() -> None:
    """Print the ledger's schema revision and whether it is the newest this release knows."""
    from ..ledger import Ledger
    from ..ledger.migrate import head

    ledger = Ledger.from_settings(load_settings())
    try:
        found = ledger.schema_revision()
    except ReceiverError as exc:
        raise Failure(str(exc)) from None
    finally:
        ledger.close()
    state = "(head)" if found == head() else f"(this release needs {head()}: run `receiver db upgrade`)"
    click.echo(f"{found or 'none'} {state}")


@db.command("rotate-key")
def rotate_key() -> None:
    """Re-encrypt every stored webhook secret under the first RECEIVER_ENCRYPTION_KEY.

    Put the new key first and keep the old one after it until this has run on the shared ledger;
    then the old key can go.
    """
    from ..ledger import Ledger

    settings = load_settings()
    if not settings.encryption_keys:
        raise ConfigurationError("RECEIVER_ENCRYPTION_KEY: is not set; list the new key first, then the old ones")
    ledger = Ledger.from_settings(settings)
    try:
        ledger.create_schema()
        count = ledger.reseal_secrets()
    except (SchemaOutdated, SecretUnreadable) as exc:
        raise ConfigurationError(str(exc)) from None
    except ReceiverError as exc:
        raise Failure(str(exc)) from None
    finally:
        ledger.close()
    click.echo(f"receiver: {count} stored webhook secret(s) encrypted under the first key")


@db.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
def stats(as_json: bool) -> None:
    """Rows and bytes (indexes included) of every ledger table, and what retention would remove now.

    Counts every row: an operator's command, it reads each table once.
    """
    from ..ledger.retention import rules

    settings = load_settings()
    policy = settings.retention
    ledger = open_ledger(settings, create=False)
    try:
        sizes = ledger.table_sizes()
        backlog = ledger.prune_backlog(policy)
    except ReceiverError as exc:
        raise Failure(str(exc)) from None
    kept = [{"rule": r.name, "setting": r.setting, "days": r.days, "removable": backlog[r.name]} for r in rules(policy, 0)]
    if as_json:
        tables = [dataclasses.asdict(s) for s in sizes]
        click.echo(json.dumps({"database": ledger.dialect, "tables": tables, "retention": kept}, indent=2))
        return
    click.echo(f"{'table':<20} {'rows':>12} {'bytes':>14}")
    for size in sizes:
        click.echo(f"{size.table:<20} {size.rows:>12,} {_human(size.bytes):>14}")
    click.echo(f"\n{'retention':<20} {'kept':>12} {'past it now':>14}  setting")
    for rule in kept:
        click.echo(f"{rule['rule']:<20} {str(rule['days']) + ' days':>12} {rule['removable']:>14,}  {rule['setting']}")


@db.command()
@click.option("--dry-run", is_flag=True, help="Count what would be removed; change nothing.")
def prune(dry_run: bool) -> None:
    """Remove what is past its retention now (the worker does the same on its own, in small steps).

    Runs in steps of a few thousand rows, each its own short transaction, so deliveries and the
    worker carry on meanwhile. SQLite's file does not shrink: freed pages are reused (README,
    "Ledger growth and retention").
    """
    settings = load_settings()
    policy = settings.retention
    ledger = open_ledger(settings, create=False)
    try:
        if dry_run:
            counts = ledger.prune_backlog(policy)
        else:
            counts = ledger.prune(policy, pause=_pause)
    except ReceiverError as exc:
        raise Failure(str(exc)) from None
    verb = "would remove" if dry_run else "removed"
    for name, count in counts.items():
        click.echo(f"{name}: {verb} {count:,}")


def _pause(step_seconds: float) -> bool:
    """`db prune` between two steps: a short fixed pause after a step that removed rows, so
    deliveries and claims take the ledger in between; an operator's prune is never stopped."""
    if step_seconds:
        time.sleep(PRUNE_PAUSE_SECONDS)
    return True


def _human(size: int | None) -> str:
    """1,234 B, 12.3 MiB, 4.5 GiB: a table's size at a glance (? when the database cannot say)."""
    if size is None:
        return "?"
    if size < 1024:
        return f"{size:,} B"
    value, unit = size / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:,.1f} {unit}"

"""`receiver db`: the ledger's schema version and the key its webhook secrets are sealed with."""

from __future__ import annotations

import dataclasses

import click

from ..errors import ReceiverError, SchemaOutdated, SecretUnreadable
from ._common import ConfigurationError, Failure, load_settings


@click.group()
def db() -> None:
    """The ledger's schema (migrations) and its encrypted secrets."""


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

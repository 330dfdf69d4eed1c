"""What every command shares: the two ways a command fails, and opening settings and the ledger.

Exit codes: 0 success, 1 the operation failed (the message says why), 2 usage or configuration.
Settings are read before anything is logged, so a bad setting prints exactly one line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from typing import IO, TYPE_CHECKING, Any

import click

from ..config import Settings
from ..errors import ConfigError, ReceiverError, SchemaOutdated, SecretUnreadable

if TYPE_CHECKING:
    from ..ledger import Ledger


#: What `status` and `register` say when RECEIVER_ENCRYPTION_KEY is not set.
UNENCRYPTED = "secrets are stored unencrypted in the ledger: set RECEIVER_ENCRYPTION_KEY to encrypt them (README, Scaling out)"


class ConfigurationError(click.ClickException):
    """A bad setting: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"receiver: configuration error: {self.format_message()}", err=True)


class Failure(click.ClickException):
    """The operation failed (exit code 1)."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"receiver: {self.format_message()}", err=True)


def load_settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise ConfigurationError(str(exc)) from None


def open_ledger(settings: Settings, *, create: bool = True) -> Ledger:
    """The ledger `settings` name, its schema brought up to date; closed when the command ends.

    `create=False` is for the commands that only read (`ls`, `cat`, `status`, ...): a SQLite file
    that does not exist is not made (an empty new ledger would answer "no batches yet" and
    "every delivery gets 401", both false); the command says where it looked instead.
    """
    from ..ledger import Ledger

    if not create:
        _require_ledger_file(settings)
    try:
        ledger = Ledger.from_settings(settings)
    except ConfigError as exc:  # a postgresql:// URL without its driver, say
        raise ConfigurationError(str(exc)) from None
    context = click.get_current_context(silent=True)
    if context is not None:  # Click closes it when the command returns or fails
        context.with_resource(contextlib.closing(ledger))
    try:
        ledger.create_schema()
        ledger.check_secrets()
    except (SchemaOutdated, SecretUnreadable) as exc:
        raise ConfigurationError(str(exc)) from None
    except ReceiverError as exc:
        raise Failure(str(exc)) from None
    return ledger


def ledger_file_missing(settings: Settings) -> str | None:
    """The SQLite file DATABASE_URL names, when it does not exist (None: it does, or not SQLite)."""
    from ..ledger.engine import sqlite_path

    path = sqlite_path(settings.database_url)
    if path is None or path == ":memory:" or os.path.exists(path):
        return None
    return os.path.abspath(path)


def _require_ledger_file(settings: Settings) -> None:
    missing = ledger_file_missing(settings)
    if missing is not None:
        raise ConfigurationError(
            f"no ledger at {missing} (DATABASE_URL={settings.database_url}); run this in the folder where "
            "`receiver serve` runs, or set DATABASE_URL to its ledger (after `receiver serve --emulator`, in its "
            "folder: set -a; . receiver-data/emulator.env; set +a)"
        )


def validate_batch_ids(batch_ids: tuple[str, ...]) -> None:
    """Refuse (exit 2) an argument that cannot be a batch id, before anything is called."""
    from .. import layout

    for batch_id in batch_ids:
        try:
            layout.validate_batch_id(batch_id)
        except ReceiverError as exc:
            raise click.BadParameter(f"{batch_id!r}: {exc}", param_hint="BATCH_ID") from None


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

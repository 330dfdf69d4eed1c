"""`receiver notify --replay BATCH_ID…`: send a batch's `batch.stored` event again."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .. import layout
from ..errors import ConfigError, ReceiverError
from ._common import ConfigurationError, Failure, load_settings, open_ledger

if TYPE_CHECKING:
    from ..config import Settings
    from ..ledger import Ledger


@click.command()
@click.option(
    "--replay",
    "batch_ids",
    multiple=True,
    required=True,
    metavar="BATCH_ID",
    help="Queue this stored batch's event again (repeatable). Same webhook-id, fresh 24 h of retries.",
)
def notify(batch_ids: tuple[str, ...]) -> None:
    """Send stored batches' batch.stored events to RECEIVER_NOTIFY_URL again.

    A running worker sends them within seconds. A batch stored before notifications were turned on
    gets its first event, built from its manifest. Exits 1 if a batch is not stored.
    """
    settings = load_settings()
    if settings.notify_url is None:
        raise ConfigurationError(str(ConfigError("RECEIVER_NOTIFY_URL", "is not set; there is nowhere to send events")))
    for batch_id in batch_ids:
        try:
            layout.validate_batch_id(batch_id)
        except ReceiverError as exc:
            raise click.BadParameter(f"{batch_id!r}: {exc}", param_hint="BATCH_ID") from None
    ledger = open_ledger(settings)
    missing = []
    try:
        for batch_id in batch_ids:
            if ledger.replay_notification(batch_id) or _first_event(settings, ledger, batch_id):
                row = ledger.notification(batch_id) or {}
                click.echo(f"{batch_id}: queued ({row.get('webhook_id')})")
            else:
                missing.append(batch_id)
    except ReceiverError as exc:
        raise Failure(str(exc)) from None
    if missing:
        raise Failure(f"not stored, nothing to announce: {', '.join(missing)}")


def _first_event(settings: Settings, ledger: Ledger, batch_id: str) -> bool:
    """Write the event of a batch stored without one, from its manifest; False if it has none."""
    from ..manifest import read_manifest
    from ..storage import open_storage

    manifest = read_manifest(open_storage(settings), batch_id)
    if manifest is None:
        return False
    ledger.add_notification(batch_id, manifest)
    return True

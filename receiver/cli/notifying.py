"""`receiver notify --replay BATCH_ID… [--target T]`: send a batch's `batch.stored` event again."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import click

from ..config import NOTIFY_TARGETS
from ..errors import ConfigError, ReceiverError
from ..manifest import read_manifest
from ..storage import open_storage
from ._common import ConfigurationError, Failure, load_settings, open_ledger, validate_batch_ids

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
@click.option(
    "--target",
    "chosen",
    multiple=True,
    type=click.Choice(NOTIFY_TARGETS),
    help="Send to this target only (repeatable); default: every target that is set.",
)
def notify(batch_ids: tuple[str, ...], chosen: tuple[str, ...]) -> None:
    """Send stored batches' batch.stored events again, to every notification target that is set
    (RECEIVER_NOTIFY_URL, RECEIVER_NOTIFY_SQS_URL, RECEIVER_NOTIFY_EVENT_BUS) or those --target names.

    A running worker sends them within seconds. A batch stored before notifications were turned on
    (or before a target was added) gets its first event, built from its manifest. Exits 1 if a batch
    is not stored.
    """
    settings = load_settings()
    if not settings.notify.targets:
        raise ConfigurationError(
            str(
                ConfigError(
                    "RECEIVER_NOTIFY_URL",
                    "nor RECEIVER_NOTIFY_SQS_URL nor RECEIVER_NOTIFY_EVENT_BUS is set; there is nowhere to send events",
                )
            )
        )
    unset = [t for t in chosen if t not in settings.notify.targets]
    if unset:
        raise click.BadParameter(
            f"{', '.join(unset)} is not set (configured: {', '.join(settings.notify.targets)})", param_hint="--target"
        )
    targets = chosen or settings.notify.targets
    validate_batch_ids(batch_ids)
    ledger = open_ledger(settings)  # it writes: the event goes into the outbox
    storage = open_storage(settings)
    missing = []
    try:
        for batch_id in batch_ids:
            # An event past RECEIVER_NOTIFICATION_RETENTION_DAYS has no body left: rebuilt from the manifest.
            manifest = functools.partial(read_manifest, storage, batch_id)
            if ledger.replay_notification(batch_id, targets, manifest=manifest) or _first_event(
                settings, ledger, batch_id, targets
            ):
                row = ledger.notification(batch_id, targets[0]) or {}
                click.echo(f"{batch_id}: queued for {', '.join(targets)} ({row.get('webhook_id')})")
            else:
                missing.append(batch_id)
    except ReceiverError as exc:
        raise Failure(str(exc)) from None
    if missing:
        raise Failure(f"not stored, nothing to announce: {', '.join(missing)}")


def _first_event(settings: Settings, ledger: Ledger, batch_id: str, targets: tuple[str, ...]) -> bool:
    """Write the event of a batch stored without one, from its manifest; False if it has none."""
    manifest = read_manifest(open_storage(settings), batch_id)
    if manifest is None:
        return False
    ledger.add_notification(batch_id, manifest, targets)
    return True

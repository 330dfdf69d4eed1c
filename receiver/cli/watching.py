"""`receiver watch`: remember batches no delivery told us about, so the polling fallback stores them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..errors import APIError, BatchNotFound, ConfigError, ReceiverError
from ._common import ConfigurationError, Failure, load_settings, open_ledger, validate_batch_ids

if TYPE_CHECKING:
    from ..batchrouter import BatchRouterClient
    from ..ledger import Ledger


@click.command()
@click.argument("batch_ids", nargs=-1, required=True)
def watch(batch_ids: tuple[str, ...]) -> None:
    """Remember these batches so they are stored even if no delivery ever arrives.

    Run it right after `POST /v1/batches`, or paste ids after an outage. Each batch is checked with
    `GET /v1/batches/{id}` first: one BatchRouter does not know exits 1 naming it; one that already
    ended is queued at once; the others are polled every RECEIVER_POLL_SECONDS until they end.
    """
    settings = load_settings()
    validate_batch_ids(batch_ids)
    from ..batchrouter import BatchRouterClient

    try:
        client = BatchRouterClient.from_settings(settings)
    except ConfigError as exc:
        raise ConfigurationError(str(exc)) from None
    ledger = open_ledger(settings)
    unknown: list[str] = []
    failed: list[str] = []
    with client:
        for batch_id in batch_ids:
            try:
                click.echo(f"{batch_id}: {watch_one(client, ledger, batch_id)}")
            except BatchNotFound:
                click.echo(f"{batch_id}: BatchRouter does not know this batch (404)", err=True)
                unknown.append(batch_id)
            except APIError as exc:
                click.echo(f"{batch_id}: not checked: {exc}", err=True)
                failed.append(batch_id)
            except ReceiverError as exc:
                raise Failure(str(exc)) from None
    if unknown:
        raise Failure(f"BatchRouter does not know {len(unknown)} of {len(batch_ids)} batches: {', '.join(unknown)}")
    if failed:
        raise Failure(f"{len(failed)} of {len(batch_ids)} batches not checked: {', '.join(failed)}")


def watch_one(client: BatchRouterClient, ledger: Ledger, batch_id: str) -> str:
    """Check one batch with `GET /v1/batches/{id}` (BatchNotFound, APIError) and hand it to the
    ledger's `watch`, the entry point the status page's Watch form uses too; what was done."""
    batch = client.get_batch(batch_id)
    return f"{batch.status}; {ledger.watch(batch_id, status=batch.status, ended=batch.terminal)}"

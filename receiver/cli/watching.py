"""`receiver watch`: remember batches no delivery told us about, so the polling fallback stores them."""

from __future__ import annotations

import click

from ..errors import APIError, BatchNotFound, ConfigError, ReceiverError
from ._common import ConfigurationError, Failure, load_settings, open_ledger, validate_batch_ids


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
    from ..ledger import ENDED

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
                batch = client.get_batch(batch_id)
            except BatchNotFound:
                click.echo(f"{batch_id}: BatchRouter does not know this batch (404)", err=True)
                unknown.append(batch_id)
                continue
            except APIError as exc:
                click.echo(f"{batch_id}: not checked: {exc}", err=True)
                failed.append(batch_id)
                continue
            try:
                ledger.watch(batch_id)
                if batch.terminal:
                    queued = ledger.record_poll(batch_id, None, status=batch.status, state=ENDED, origin="watch")
                    click.echo(f"{batch_id}: {batch.status}; " + ("queued to be stored now" if queued else "already queued"))
                else:
                    click.echo(f"{batch_id}: {batch.status}; watched (polled until it ends)")
            except ReceiverError as exc:
                raise Failure(str(exc)) from None
    if unknown:
        raise Failure(f"BatchRouter does not know {len(unknown)} of {len(batch_ids)} batches: {', '.join(unknown)}")
    if failed:
        raise Failure(f"{len(failed)} of {len(batch_ids)} batches not checked: {', '.join(failed)}")

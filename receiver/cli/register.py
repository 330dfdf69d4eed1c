"""`receiver register`: the command; the steps themselves are in `registration`."""

from __future__ import annotations

import logging

import click

from ..errors import ConfigError, ReceiverError
from ..logs import configure_logging
from ._common import UNENCRYPTED, ConfigurationError, Failure, load_settings
from .registration import BATCHROUTER_RETRY_WINDOW_SECONDS, FAIL, WARN, Step, run, validate_hook_url


@click.command()
@click.option(
    "--url",
    metavar="URL",
    help="Public HTTPS URL of this receiver's hook, e.g. https://hooks.example.com/hooks/batchrouter. Default: RECEIVER_PUBLIC_URL.",
)
@click.option(
    "--rotate",
    is_flag=True,
    help="Make a new signing secret current; the previous one stays accepted for RECEIVER_SECRET_GRACE_HOURS (default 48).",
)
@click.option("--insecure", is_flag=True, help="Allow a plain http:// URL on a loopback host (the local emulator only).")
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False, readable=True),
    help="PEM bundle to verify the URL's certificate during the self-test, for a private CA (e.g. Caddy's `tls internal`). BatchRouter itself needs a publicly trusted certificate.",
)
def register(url: str | None, rotate: bool, insecure: bool, ca_file: str | None) -> None:
    """Point BatchRouter's delivery webhook at this receiver and prove a signed delivery gets in.

    Checks the API key and the storage, stores the signing secret in the ledger (every instance
    accepts it at once), sends a signed self-test delivery to the URL and confirms this receiver
    recorded it, and only then sets the webhook with PUT /v1/auth/account/delivery-webhook: a URL
    that fails the self-test leaves BatchRouter's webhook as it was. Prints a checklist;
    exits 1 with the reason when a step fails, 2 for a bad URL or setting. Running it again is safe:
    the current secret is kept unless --rotate is given. Secrets are never printed.
    """
    settings = load_settings()
    source = "--url" if url else "RECEIVER_PUBLIC_URL"
    url = url or settings.public_url
    if not url:
        raise ConfigurationError("no URL to register: pass --url https://…/hooks/batchrouter or set RECEIVER_PUBLIC_URL")
    try:
        url = validate_hook_url(url, insecure=insecure, source=source)
        settings.require_api_key()
    except ConfigError as exc:
        raise ConfigurationError(str(exc)) from None
    configure_logging(logging.WARNING)  # the checklist is the output

    def show(step: Step) -> None:
        if step.status != FAIL:  # the failed step is the error message, on stderr
            click.echo(step.line())

    if rotate and settings.web.secret_grace_seconds < BATCHROUTER_RETRY_WINDOW_SECONDS:
        show(
            Step(
                WARN,
                "grace period",
                f"RECEIVER_SECRET_GRACE_HOURS is {settings.web.secret_grace_seconds / 3600:g} h, shorter than "
                "BatchRouter's 24 h of retries: a retried delivery signed with the previous secret may be refused",
            )
        )
    try:
        result = run(settings, url, rotate=rotate, ca_file=ca_file, on_step=show)
    except ConfigError as exc:
        raise ConfigurationError(str(exc)) from None
    except ReceiverError as exc:
        raise Failure(str(exc)) from None
    if not result.ok:
        raise Failure(f"register failed: {result.failure}")
    if not result.minted:
        summary = "the current signing secret was kept (--rotate makes a new one)"
    elif result.retired:
        summary = (
            f"a new signing secret is current; the previous one stays accepted for {settings.web.secret_grace_seconds / 3600:g} h"
        )
    else:
        summary = "a new signing secret is current"
    click.echo(f"registered {url}: {summary}")
    if not settings.encryption_keys:
        click.echo(f"note: {UNENCRYPTED}")

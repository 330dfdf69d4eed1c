"""Commands that run the service: `serve` (web and worker together), `worker`, `emulator`."""

from __future__ import annotations

import os
import sys

import click

from ..config import Settings
from ..errors import ConfigError
from ._common import ConfigurationError, Failure, load_settings, open_ledger


@click.command()
@click.option(
    "--emulator",
    "with_emulator",
    is_flag=True,
    help="Also run a local BatchRouter emulator and point the receiver at it (no account needed).",
)
@click.option("--emulator-port", default=8081, show_default=True, help="Port of the emulator started by --emulator.")
@click.option(
    "--emulator-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the emulator binds; 0.0.0.0 in a container, so that a published port reaches it.",
)
@click.option(
    "--host",
    metavar="ADDRESS",
    help="Address the web server listens on. Default: 127.0.0.1 with --emulator (a laptop's dev server is "
    "not for other machines), 0.0.0.0 otherwise (as the Procfile's web).",
)
def serve(with_emulator: bool, emulator_port: int, emulator_host: str, host: str | None) -> None:
    """Run the web server (gunicorn) and the worker together, on the embedded defaults.

    SQLite and a local folder unless DATABASE_URL / RECEIVER_STORAGE_URL say otherwise. Stops both on
    SIGTERM or Ctrl-C, letting the worker give back its jobs. With --emulator, also writes
    receiver-data/emulator.env: the settings a second shell needs (`set -a; . receiver-data/emulator.env; set +a`).
    """
    settings = load_settings()
    from .supervise import Supervisor, check_port_free, emulator_args, emulator_env

    if not with_emulator:
        try:
            settings.require_api_key()  # the worker's first need: refuse here, before anything starts
        except ConfigError as exc:
            raise ConfigurationError(f"{exc} (or try `receiver serve --emulator`: no account needed)") from None
    host = host or ("127.0.0.1" if with_emulator else "0.0.0.0")
    check_port_free(host, settings.port, "set PORT to a free port (e.g. PORT=8001)")
    env = dict(os.environ)
    if with_emulator:
        if emulator_port == settings.port:
            raise ConfigurationError(f"PORT and --emulator-port are both {emulator_port}; give them different ports")
        check_port_free(emulator_host, emulator_port, "choose another with --emulator-port")
        env = emulator_env(env, emulator_port)
        settings = Settings.from_env(env)
    from ..logs import configure_logging

    configure_logging(log_format=settings.log_format)
    open_ledger(settings).close()  # create the schema once, before several processes race for it
    children = Supervisor()
    web_url = f"http://{_local_address(host)}:{settings.port}"
    urls = [f"{web_url}/healthz"]
    if with_emulator:
        children.start("emulator", emulator_args(emulator_port, host=emulator_host), env)
        urls.append(f"{settings.api_url}/healthz")
    gunicorn = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "python:receiver.web.gunicorn_conf",
        "--bind",
        _bind_address(host, settings.port),
        "receiver.app:create_app()",
    ]
    children.start("gunicorn", gunicorn, env)
    children.start("worker", [sys.executable, "-m", "receiver", "worker"], env)
    children.wait_until_up(urls)
    if not with_emulator:
        click.echo(f"receiver: serving on {web_url}", err=True)
        sys.exit(children.run())
    try:
        _connect_emulator(settings, f"{web_url}/hooks/batchrouter")
    except BaseException:
        children.stop()
        raise
    click.echo(
        f"receiver: serving on {web_url} with the emulator on {settings.api_url}\n"
        f"  complete a batch:  curl -s -XPOST {settings.api_url}/_emulator/batches -H 'content-type: application/json'"
        ' -d \'{"items": 1000, "status": "completed", "deliver": true}\'\n'
        f"  results land in:   {settings.storage_url}/results/  (see `receiver ls`)\n"
        "  a second shell:    set -a; . receiver-data/emulator.env; set +a   (then `receiver fetch`, `receiver worker`, ...)",
        err=True,
    )
    sys.exit(children.run())


def _local_address(host: str) -> str:
    """Where this host reaches a server listening on `host` (a wildcard is reached on loopback)."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _connect_emulator(settings: Settings, hook_url: str) -> None:
    """Give the emulator this receiver's webhook, and write the settings file for a second shell."""
    from ..errors import ReceiverError
    from .supervise import register_with_emulator, write_emulator_env

    try:
        register_with_emulator(settings, hook_url)
    except ReceiverError as exc:
        raise Failure(f"the emulator refused the webhook: {exc}") from None
    write_emulator_env(settings)


@click.command()
def worker() -> None:
    """Run the job runner alone (the Procfile's `worker:`)."""
    settings = load_settings()
    from ..jobs.worker import Worker
    from ..logs import configure_logging

    configure_logging(log_format=settings.log_format)
    ledger = open_ledger(settings)
    try:
        runner = Worker.from_settings(settings, ledger)
    except ConfigError as exc:
        raise ConfigurationError(str(exc)) from None
    runner.install_signal_handlers()
    runner.run_forever()


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def emulator(ctx: click.Context) -> None:
    """A local BatchRouter emulator for development and tests (`receiver emulator --help`)."""
    from ..emulator.__main__ import main as emulator_main

    sys.exit(emulator_main(list(ctx.args), prog="receiver emulator"))

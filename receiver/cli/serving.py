"""Commands that run the service: `serve` (web and worker together), `worker`, `emulator`."""

from __future__ import annotations

import os
import subprocess
import sys

import click

from ..config import Settings
from ..errors import ConfigError
from ._common import ConfigurationError, load_settings, open_ledger


@click.command()
@click.option(
    "--emulator",
    "with_emulator",
    is_flag=True,
    help="Also run a local BatchRouter emulator and point the receiver at it (no account needed).",
)
@click.option("--emulator-port", default=8081, show_default=True, help="Port of the emulator started by --emulator.")
def serve(with_emulator: bool, emulator_port: int) -> None:
    """Run the web server (gunicorn) and the worker together, on the embedded defaults.

    SQLite and a local folder unless DATABASE_URL / RECEIVER_STORAGE_URL say otherwise. Stops both on
    SIGTERM or Ctrl-C, letting the worker give back its jobs.
    """
    settings = load_settings()
    from ..logs import configure_logging

    configure_logging(log_format=settings.log_format)
    env = dict(os.environ)
    children: list[subprocess.Popen[bytes]] = []
    if with_emulator:
        from .supervise import start_emulator_for_serve

        env, emulator = start_emulator_for_serve(settings, env, emulator_port)
        children.append(emulator)
        settings = Settings.from_env(env)
    open_ledger(settings).close()  # create the schema once, before several processes race for it
    web = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:receiver.web.gunicorn_conf", "receiver.app:create_app()"], env=env
    )
    worker = subprocess.Popen([sys.executable, "-m", "receiver", "worker"], env=env)
    children += [web, worker]
    if with_emulator:
        from .supervise import register_with_emulator

        register_with_emulator(settings, f"http://127.0.0.1:{settings.port}/hooks/batchrouter")
        click.echo(
            f"receiver: serving on http://127.0.0.1:{settings.port} with the emulator on {settings.api_url}\n"
            f"  complete a batch:  curl -s -XPOST {settings.api_url}/_emulator/batches -H 'content-type: application/json'"
            ' -d \'{"items": 1000, "status": "completed", "deliver": true}\'\n'
            f"  results land in:   {settings.storage_url}/results/  (see `receiver ls`)",
            err=True,
        )
    from .supervise import supervise

    sys.exit(supervise(children))


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

    sys.exit(emulator_main(list(ctx.args)))

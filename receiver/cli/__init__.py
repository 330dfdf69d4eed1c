"""The `receiver` command: Click commands over the same functions the service runs.

`receiver.cli:main` is the console script's entry point.
"""

from __future__ import annotations

import click

from .. import __version__
from .db import db
from .notifying import notify
from .operating import cat, fetch, list_batches, status
from .register import register
from .serving import emulator, serve, worker
from .waiting import wait
from .watching import watch


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="receiver")
def main() -> None:
    """BatchRouter's delivery webhook: verify, record, fetch and store each batch exactly once."""


for _command in (serve, worker, register, fetch, list_batches, cat, status, watch, emulator, wait, notify, db):
    main.add_command(_command)

__all__ = ["main"]

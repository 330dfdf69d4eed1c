"""A local BatchRouter emulator: the API, a signed-URL artifact host, deliveries and faults.

Developers run it with `receiver emulator` (or `python -m receiver.emulator`); the tests start it
on a thread with :func:`start_in_thread` and talk to it over real HTTP.
"""

from __future__ import annotations

from .app import EmulatorConfig, create_app
from .server import serve, start_in_thread, stop

__all__ = ["EmulatorConfig", "create_app", "serve", "start_in_thread", "stop"]

"""Run the emulator as a real threaded HTTP server, in the foreground or on a thread for tests.

Werkzeug's server is enough here: one thread per connection, so a stalled artifact download does not
hold up API calls, and each response streams from a generator straight to the socket.
"""

from __future__ import annotations

import sys
import threading

from flask import Flask
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.urls import uri_to_iri

from .app import EmulatorConfig, create_app


class QuietRequestHandler(WSGIRequestHandler):
    """A request handler that does not log every request (tests make thousands)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class PlainRequestHandler(WSGIRequestHandler):
    """Werkzeug's request log without its ANSI colours, for a log that goes to a file or a pipe."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        try:
            msg = f"{self.command} {uri_to_iri(self.path)} {self.request_version}"
        except AttributeError:  # no path when the request line was bad
            msg = self.requestline
        self.log("info", '"%s" %s %s', msg.translate(self._control_char_table), code, size)


def make_emulator_server(config: EmulatorConfig, *, quiet: bool = False) -> BaseWSGIServer:
    """Bind the emulator's server (port 0 picks a free port); the caller runs it."""
    app = create_app(config)
    if quiet:
        handler: type[WSGIRequestHandler] = QuietRequestHandler
    elif sys.stderr.isatty():
        handler = WSGIRequestHandler
    else:
        handler = PlainRequestHandler
    return make_server(config.host, config.port, app, threaded=True, request_handler=handler)


def server_url(server: BaseWSGIServer) -> str:
    """The base URL a client on this machine uses to reach `server`."""
    # The bound address; `server_address` is typed loosely enough to allow bytes, an IP socket's never is.
    host: str = server.socket.getsockname()[0]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{server.server_port}"


def serve(config: EmulatorConfig, *, quiet: bool = False) -> None:
    """Serve until interrupted (Ctrl-C or SIGINT)."""
    server = make_emulator_server(config, quiet=quiet)
    print(f"BatchRouter emulator listening on {server_url(server)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop(server)


def start_in_thread(config: EmulatorConfig, *, quiet: bool = True) -> tuple[BaseWSGIServer, str]:
    """Start a server on a daemon thread; return it and its base URL. Stop it with :func:`stop`."""
    server = make_emulator_server(config, quiet=quiet)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.1},
        name="emulator-server",
        daemon=True,
    )
    thread.start()
    return server, server_url(server)


def stop(server: BaseWSGIServer) -> None:
    """Stop serving, close the socket and give up the retries of pending deliveries."""
    if isinstance(server.app, Flask):  # always, for servers made here; the check tells mypy
        server.app.extensions["emulator"].deliverer.cancel_pending()
    server.shutdown()
    server.server_close()

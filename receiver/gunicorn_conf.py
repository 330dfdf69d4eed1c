"""`-c python:receiver.gunicorn_conf` is what deployed systemd units name; the settings themselves
live in `receiver.web.gunicorn_conf`."""

from .web.gunicorn_conf import *  # noqa: F401,F403

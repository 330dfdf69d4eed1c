"""`receiver.app:create_app` is what the Procfile, the systemd unit and existing deployments name;
the app factory itself lives in `receiver.web.app`."""

from .web.app import create_app

__all__ = ["create_app"]

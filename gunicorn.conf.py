# gunicorn reads this file from the working directory (Procfile `web:`); the settings live in the
# package so that `receiver serve` uses the very same ones.
from receiver.web.gunicorn_conf import *  # noqa: F401,F403

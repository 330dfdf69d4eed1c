# The one image every role runs: web (the default command, as the Procfile's `web:` runs it),
# `receiver worker`, and `receiver db upgrade` (the release step). README, "Run in a container".
#
#   docker build -t batchrouter-receiver .
#
# BASE is any image with Python 3.11+ (`python3` and its venv module) on a glibc distribution with
# `useradd`; the official slim image by default. Both stages use it, so the virtualenv copied from
# the first stage finds the same interpreter at the same path in the second.
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
# Building needs the package index. Where a machine reaches it through its own CA or its own index
# configuration, pass them as build secrets, which are mounted for one RUN and never stored in a
# layer:  --secret id=pipca,src=/etc/ssl/certs/ca-certificates.crt  (becomes PIP_CERT)
#         --secret id=pipconf,src=pip.conf                          (becomes PIP_CONFIG_FILE)
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/receiver
WORKDIR /src
# The dependencies first, from pyproject.toml alone (with the postgres extra): this layer is reused
# until they change, whatever happens to the code.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pipca --mount=type=secret,id=pipconf --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi; \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi; \
    python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["postgres"]))' >/tmp/requirements.txt && \
    /opt/receiver/bin/pip install -r /tmp/requirements.txt
# Then the package as a wheel (what users install), without touching the dependencies again.
COPY README.md ./
COPY receiver ./receiver
RUN --mount=type=secret,id=pipca --mount=type=secret,id=pipconf --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi; \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi; \
    /opt/receiver/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . && \
    /opt/receiver/bin/pip install --no-deps /tmp/wheels/*.whl && \
    /opt/receiver/bin/pip uninstall --yes pip setuptools && \
    /opt/receiver/bin/receiver --help >/dev/null

FROM ${BASE}
# A fixed uid and gid, so a mounted folder or a Kubernetes securityContext (runAsUser, fsGroup) can
# name them: files the receiver writes into a volume belong to 10001:10001.
ARG UID=10001
RUN useradd --uid "${UID}" --user-group --create-home --home-dir /home/receiver --shell /usr/sbin/nologin receiver && \
    install -d -o "${UID}" -g "${UID}" /srv/receiver /srv/receiver/receiver-data
COPY --from=build /opt/receiver /opt/receiver
# PORT is left to the receiver's own default (8000), so a mounted .env may set it too.
ENV PATH=/opt/receiver/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The working folder: the embedded defaults (SQLite ledger, local storage, `serve --emulator`'s
# emulator.env) live in ./receiver-data, a volume. With PostgreSQL and S3 nothing is kept here.
WORKDIR /srv/receiver
VOLUME ["/srv/receiver/receiver-data"]
USER ${UID}:${UID}
EXPOSE 8000
# SIGTERM: gunicorn drains in-flight requests within its graceful_timeout (30 s) and exits 0;
# `receiver worker` gives back the leases of the jobs in hand and aborts unfinished uploads, then
# exits 0: a download stops at once, even one stalled on a silent host; an API call in hand ends
# within its 15 s timeout and the background duties get 15 s more.
# Grace periods between SIGTERM and SIGKILL: 35 s for the web role and for the worker
# (docker/podman `stop -t`, ECS stopTimeout, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# Probes, for the web role only (the worker serves no HTTP): GET /healthz (liveness) and GET /readyz
# (readiness: ledger and storage reachable). No HEALTHCHECK here, since the same image runs the worker.
CMD ["gunicorn", "-c", "python:receiver.web.gunicorn_conf", "receiver.app:create_app()"]

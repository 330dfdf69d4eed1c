"""The settings object: built from the environment once, validated once, then passed in.

Nothing else in the package reads ``os.environ``. A bad value raises :class:`ConfigError` naming the
variable and the fix; the CLI and the gunicorn entry point turn that into one line and exit code 2.

:class:`Settings` holds what every process needs to find its place: where BatchRouter is and the
key to it, the ledger, the storage root, the public URL, the port, the log format, whether to
migrate, and the keys the ledger's secrets are sealed with (the web, the worker and the CLI all open
the ledger and storage, so none of these belongs to one subsystem). The rest is grouped by the one
subsystem that reads it, each group a frozen object with its own ``from_mapping``:
``settings.web`` (:class:`WebSettings`), ``settings.worker`` (:class:`WorkerSettings`),
``settings.notify`` (:class:`NotifySettings`), ``settings.s3`` (:class:`S3Settings`) and
``settings.retention`` (:class:`RetentionSettings`). A reader sees at a glance which part a knob
serves; the ledger's retention rules take just their group, and a test builds only the groups it
changes. The environment variable names stay flat (``RECEIVER_…``): the
grouping is this module's, not the operator's.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import importlib.util
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import ConfigError, UnsupportedDatabase

#: Where a `batch.stored` event can go; each set target gets every event, tracked on its own. The
#: names are the ledger's `target` column, the metrics' `target` label and `notify --target`.
WEBHOOK, SQS, EVENTBRIDGE = "webhook", "sqs", "eventbridge"
NOTIFY_TARGETS = (WEBHOOK, SQS, EVENTBRIDGE)
#: An SQS queue URL's path: /<12-digit account>/<queue name>, a FIFO queue's name ending in .fifo
#: (https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-queues.html).
_SQS_PATH = re.compile(r"/\d{12}/([A-Za-z0-9_-]{1,80}|[A-Za-z0-9_-]{1,75}\.fifo)")
#: A bus name, or its ARN (https://docs.aws.amazon.com/eventbridge/latest/APIReference/API_PutEventsRequestEntry.html).
_EVENT_BUS = re.compile(r"[A-Za-z0-9._/-]{1,256}|arn:aws[a-z-]*:events:[a-z0-9-]+:\d{12}:event-bus/[A-Za-z0-9._/-]{1,256}")

DEFAULT_API_URL = "https://api.batchrouter.com"
DEFAULT_STORAGE_URL = "./receiver-data/storage"
DEFAULT_DATABASE_URL = "sqlite:///./receiver-data/receiver.db"
#: What a postgresql:// DATABASE_URL without the driver installed says.
POSTGRES_DRIVER_MISSING = "PostgreSQL needs psycopg: pip install 'batchrouter-receiver[postgres]'"


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """How the worker process runs its jobs and duties: how many downloads at once, how long a
    claim holds, how often and how patiently to retry, which artifact hosts it may reach, and how
    often it polls. A group because only receiver/jobs (and `fetch`, which runs the worker's
    code in the foreground) reads it; the notifiers share its backoff, lease and timeouts."""

    #: Downloads in flight per worker process.
    concurrency: int = 4
    #: Seconds a claimed job stays ours without a heartbeat; a crashed worker's job returns after it.
    lease_seconds: float = 30.0
    #: Attempts before a job is `dead`.
    max_attempts: int = 8
    #: First retry delay and the cap of the exponential backoff, in seconds.
    retry_base_seconds: float = 1.0
    retry_cap_seconds: float = 60.0
    #: Artifact read timeout: a stalled host frees the download slot after this many seconds.
    read_timeout_seconds: float = 60.0
    connect_timeout_seconds: float = 10.0
    #: Artifact hosts allowed although private or loopback, and allowed over plain http.
    artifact_hosts: tuple[str, ...] = ()
    #: How often a known, unfinished batch is polled with `GET /v1/batches/{id}`; 0 turns it off.
    poll_seconds: int = 300

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> WorkerSettings:
        return cls(
            artifact_hosts=tuple(_validate_host(h) for h in _split_list(env.get("RECEIVER_ARTIFACT_HOSTS"))),
            concurrency=_int(env, "RECEIVER_WORKER_CONCURRENCY", 4, 1, 256),
            lease_seconds=float(_int(env, "RECEIVER_LEASE_SECONDS", 30, 2, 3600)),
            max_attempts=_int(env, "RECEIVER_MAX_ATTEMPTS", 8, 1, 1000),
            retry_base_seconds=_float(env, "RECEIVER_RETRY_BASE_SECONDS", 1.0, 0.01, 3600),
            retry_cap_seconds=_float(env, "RECEIVER_RETRY_CAP_SECONDS", 60.0, 0.01, 86400),
            read_timeout_seconds=_float(env, "RECEIVER_READ_TIMEOUT_SECONDS", 60.0, 0.1, 3600),
            connect_timeout_seconds=_float(env, "RECEIVER_CONNECT_TIMEOUT_SECONDS", 10.0, 0.1, 600),
            poll_seconds=_int(env, "RECEIVER_POLL_SECONDS", 300, 0, 7 * 86400),
        )


@dataclasses.dataclass(frozen=True)
class WebSettings:
    """What the web process accepts: which signatures, how large a body, how slow a client, whose
    forwarded headers, and who may open the status page. A group because receiver/web reads these
    (and `register` the secret grace it applies when rotating) and the worker reads none of them."""

    #: Signing secrets accepted besides the ledger's (RECEIVER_WEBHOOK_SECRET, comma-separated).
    webhook_secrets: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    #: How long a rotated-out webhook secret stays accepted (longer than BatchRouter's 24 h retries).
    secret_grace_seconds: float = 48 * 3600.0
    #: Largest delivery body accepted, in bytes (413 above it).
    max_body_bytes: int = 1024 * 1024
    #: The hook's deadline for each read from (and write to) a client: a client that stalls
    #: mid-request is cut off after this many seconds instead of holding its connection for ever.
    client_timeout_seconds: float = 10.0
    #: Proxies in front of gunicorn whose X-Forwarded-* headers we trust (0: trust none).
    trusted_proxies: int = 0
    #: Turns the status page at /admin on; the token is its password. None: /admin answers 404.
    admin_token: str | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> WebSettings:
        secrets = tuple(_split_list(env.get("RECEIVER_WEBHOOK_SECRET")))
        for secret in secrets:
            if not 8 <= len(secret) <= 256:
                raise ConfigError("RECEIVER_WEBHOOK_SECRET", "each secret must be 8 to 256 characters (comma-separated list)")
        admin_token = _text(env, "RECEIVER_ADMIN_TOKEN")
        if admin_token is not None and (len(admin_token) < 16 or not admin_token.isprintable() or " " in admin_token):
            raise ConfigError("RECEIVER_ADMIN_TOKEN", "must be at least 16 characters without spaces; try `openssl rand -hex 24`")
        return cls(
            webhook_secrets=secrets,
            secret_grace_seconds=_float(env, "RECEIVER_SECRET_GRACE_HOURS", 48.0, 0.0, 24 * 365) * 3600,
            max_body_bytes=_int(env, "RECEIVER_MAX_BODY_BYTES", 1024 * 1024, 1024, 64 * 1024 * 1024),
            client_timeout_seconds=_float(env, "RECEIVER_CLIENT_TIMEOUT_SECONDS", 10.0, 0.1, 600),
            trusted_proxies=_int(env, "RECEIVER_TRUSTED_PROXIES", 0, 0, 10),
            admin_token=admin_token,
        )


@dataclasses.dataclass(frozen=True)
class NotifySettings:
    """Where each stored batch's `batch.stored` event goes, and for how long it is retried. A group
    because only the notifier duties, their senders and `receiver notify` read it (they share the
    backoff and network timeouts of downloads, in WorkerSettings). Every target that is set gets
    every event, tracked on its own."""

    #: Where `batch.stored` events are POSTed (None: this target is off), and their signing secret.
    url: str | None = None
    secret: str | None = dataclasses.field(default=None, repr=False)
    #: Hosts (besides loopback) where the notify URL may be plain http: a private network's consumer.
    hosts: tuple[str, ...] = ()
    #: An SQS queue URL (standard or `.fifo`) that gets every `batch.stored` event as a message.
    sqs_url: str | None = None
    #: An EventBridge bus name or ARN that gets every `batch.stored` event (`PutEvents`).
    event_bus: str | None = None
    #: How long an event is retried before it is marked failed (the contract: at least 24 hours).
    retry_seconds: float = 25 * 3600.0

    @property
    def targets(self) -> tuple[str, ...]:
        """The notification targets that are set, in NOTIFY_TARGETS order (empty: notifications off)."""
        chosen = {WEBHOOK: self.url, SQS: self.sqs_url, EVENTBRIDGE: self.event_bus}
        return tuple(target for target in NOTIFY_TARGETS if chosen[target] is not None)

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> NotifySettings:
        hosts = tuple(_validate_host(h, "RECEIVER_NOTIFY_HOSTS") for h in _split_list(env.get("RECEIVER_NOTIFY_HOSTS")))
        url = _validate_notify_url(_text(env, "RECEIVER_NOTIFY_URL"), hosts)
        return cls(
            url=url,
            secret=_validate_notify_secret(_text(env, "RECEIVER_NOTIFY_SECRET"), required=url is not None),
            hosts=hosts,
            sqs_url=_validate_sqs_url(_text(env, "RECEIVER_NOTIFY_SQS_URL")),
            event_bus=_validate_event_bus(_text(env, "RECEIVER_NOTIFY_EVENT_BUS")),
        )


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """How objects are written when RECEIVER_STORAGE_URL is an s3:// URL (ignored for a local
    folder). A group because only the S3 backend reads them, and it reads nothing else of ours."""

    #: Server-side encryption asked of S3: None (the bucket's default), AES256 or aws:kms.
    sse: str | None = None
    #: The KMS key for aws:kms (None: the AWS-managed key).
    kms_key_id: str | None = None
    #: Ask S3 to verify a SHA-256 checksum of each part; some S3-compatible stores reject it.
    checksum: bool = True
    #: Memory budget of one S3 streaming upload (parts buffered in flight), in bytes.
    buffer_bytes: int = 24 * 1024 * 1024

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> S3Settings:
        sse = _text(env, "RECEIVER_S3_SSE")
        if sse is not None and sse not in ("AES256", "aws:kms"):
            raise ConfigError("RECEIVER_S3_SSE", "must be AES256 or aws:kms")
        kms_key = _text(env, "RECEIVER_S3_KMS_KEY_ID")
        if kms_key is not None and sse != "aws:kms":
            raise ConfigError("RECEIVER_S3_KMS_KEY_ID", "needs RECEIVER_S3_SSE=aws:kms")
        return cls(
            sse=sse,
            kms_key_id=kms_key,
            checksum=_bool(env, "RECEIVER_S3_CHECKSUM", True),
            buffer_bytes=_int(env, "RECEIVER_S3_BUFFER_MB", 24, 16, 4096) * 1024 * 1024,
        )


@dataclasses.dataclass(frozen=True)
class RetentionSettings:
    """Days each kind of ledger row is kept before the worker's housekeeping (or `receiver db
    prune`) removes it. A group of its own because the ledger's retention rules take exactly these
    five numbers and nothing else: tests and benchmarks build one without building a whole
    `Settings`. Each minimum keeps what correctness needs (see receiver/ledger/retention.py)."""

    #: Delivery records, kept for event-id deduplication (BatchRouter retries for 24 h).
    delivery_days: int = 14
    #: A finished attempt's row (retries by cause, throughput on the status page).
    attempt_days: int = 30
    #: A sent (or failed) `batch.stored` event's body; `notify --replay` rebuilds it from the
    #: manifest after that. The row (and its webhook-id) stays as long as the job's.
    notification_days: int = 7
    #: A stored batch's job row (and its known-batch and event rows); a delivery for a batch pruned
    #: after that adopts the manifest in storage and downloads nothing.
    job_days: int = 30
    #: The per-minute counts of deliveries refused for their signature.
    refused_days: int = 7

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> RetentionSettings:
        return cls(
            delivery_days=_int(env, "RECEIVER_DELIVERY_RETENTION_DAYS", 14, 7, 3650),
            # Minimums keep what correctness needs: a body until its 25 h of retries are over, a
            # day of attempts and refusals for `status`, a job past BatchRouter's 24 h of retries.
            notification_days=_int(env, "RECEIVER_NOTIFICATION_RETENTION_DAYS", 7, 2, 3650),
            attempt_days=_int(env, "RECEIVER_ATTEMPT_RETENTION_DAYS", 30, 2, 3650),
            job_days=_int(env, "RECEIVER_JOB_RETENTION_DAYS", 30, 7, 36500),
            refused_days=_int(env, "RECEIVER_REFUSED_RETENTION_DAYS", 7, 2, 3650),
        )


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of the receiver: the process-wide ones here, the rest in one group per subsystem.
    Defaults are the embedded ones: SQLite and a local folder."""

    api_key: str | None = dataclasses.field(default=None, repr=False)
    api_url: str = DEFAULT_API_URL
    storage_url: str = DEFAULT_STORAGE_URL
    database_url: str = DEFAULT_DATABASE_URL
    #: The hook's public URL, for `register` without `--url`.
    public_url: str | None = None
    #: The HTTP port the web process listens on.
    port: int = 8000
    #: `text` (a line for people) or `json` (one object per line for a log pipeline).
    log_format: str = "text"
    #: Bring the ledger's schema up to date at start; when false an older schema stops the process.
    auto_migrate: bool = True
    #: Fernet keys sealing the stored webhook secrets: the first encrypts, every one decrypts.
    encryption_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    web: WebSettings = dataclasses.field(default_factory=WebSettings)
    worker: WorkerSettings = dataclasses.field(default_factory=WorkerSettings)
    notify: NotifySettings = dataclasses.field(default_factory=NotifySettings)
    s3: S3Settings = dataclasses.field(default_factory=S3Settings)
    retention: RetentionSettings = dataclasses.field(default_factory=RetentionSettings)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, dotenv_path: str | os.PathLike[str] | None = ".env"
    ) -> Settings:
        """Read the environment (and a ``.env`` file, which the environment overrides)."""
        env: dict[str, str] = {}
        if dotenv_path is not None and Path(dotenv_path).is_file():
            from dotenv import dotenv_values

            env.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        from_file = set(env)
        environment = os.environ if environ is None else environ
        env.update(environment)
        try:
            return cls.from_mapping(env)
        except ConfigError as exc:
            if exc.variable in from_file and exc.variable not in environment:  # say where to fix it
                raise type(exc)(exc.variable, f"{exc.problem} (set in {dotenv_path})") from None
            raise

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> Settings:
        api_url = _validate_api_url(_text(env, "BATCHROUTER_API_URL") or DEFAULT_API_URL)
        api_key = _text(env, "BATCHROUTER_API_KEY")
        if api_key is not None and (not api_key.isprintable() or " " in api_key):
            raise ConfigError("BATCHROUTER_API_KEY", "contains spaces or control characters; paste the key exactly")
        storage_url = _text(env, "RECEIVER_STORAGE_URL") or DEFAULT_STORAGE_URL
        parse_storage_url(storage_url)
        database_url = _validate_database_url(_text(env, "DATABASE_URL") or DEFAULT_DATABASE_URL)
        public_url = _text(env, "RECEIVER_PUBLIC_URL")
        if public_url is not None and urlsplit(public_url).scheme not in ("http", "https"):
            raise ConfigError("RECEIVER_PUBLIC_URL", "must be an https:// URL, e.g. https://hooks.example.com/hooks/batchrouter")
        log_format = (_text(env, "RECEIVER_LOG_FORMAT") or "text").lower()
        if log_format not in ("text", "json"):
            raise ConfigError("RECEIVER_LOG_FORMAT", f"must be text or json, not {log_format!r}")
        return cls(
            api_key=api_key,
            api_url=api_url,
            storage_url=storage_url,
            database_url=database_url,
            public_url=public_url,
            port=_int(env, "PORT", 8000, 1, 65535),
            log_format=log_format,
            auto_migrate=_bool(env, "RECEIVER_AUTO_MIGRATE", True),
            encryption_keys=_validate_fernet_keys(_split_list(env.get("RECEIVER_ENCRYPTION_KEY"))),
            web=WebSettings.from_mapping(env),
            worker=WorkerSettings.from_mapping(env),
            notify=NotifySettings.from_mapping(env),
            s3=S3Settings.from_mapping(env),
            retention=RetentionSettings.from_mapping(env),
        )

    def require_api_key(self) -> str:
        """The API key, or a configuration error for the commands that need one."""
        if not self.api_key:
            raise ConfigError(
                "BATCHROUTER_API_KEY",
                "is not set; create a key in the BatchRouter console and export it (for the local emulator, "
                "load the settings `receiver serve --emulator` wrote: set -a; . receiver-data/emulator.env; set +a)",
            )
        return self.api_key


def _text(env: Mapping[str, str], name: str) -> str | None:
    """A variable's value, trimmed; None when it is unset or blank."""
    value = env.get(name)
    if value is None:
        return None
    return value.strip() or None


def _split_list(value: str | None) -> list[str]:
    if not value:
        return []
    return [item.strip() for item in value.split(",") if item.strip()]


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be a whole number from {low} to {high}, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(name, f"must be a whole number from {low} to {high}, not {raw!r}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number from {low:g} to {high:g}, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(name, f"must be a number from {low:g} to {high:g}, not {raw!r}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"must be true or false, not {raw!r}")


def _validate_api_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "BATCHROUTER_API_URL",
            f"must be an https:// URL such as {DEFAULT_API_URL} (or http:// on loopback for the emulator)",
        )
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError("BATCHROUTER_API_URL", "plain http is allowed only on loopback (the emulator); use https://")
    return url.rstrip("/")


#: The storage URL schemes, and the backend each one opens: config checks a URL against this list
#: and `receiver.storage.storage_from_url` opens what it names, so a new backend is one entry here
#: and one branch there. No scheme is a local path.
STORAGE_SCHEMES = {"": "local", "file": "local", "s3": "s3"}


@dataclasses.dataclass(frozen=True)
class StorageLocation:
    """Where a storage URL points: a `local` folder (`path`) or an `s3` bucket and key prefix."""

    backend: str
    path: str
    bucket: str = ""


def parse_storage_url(url: str, setting: str = "RECEIVER_STORAGE_URL") -> StorageLocation:
    """Read a storage root URL (a path, `file://…` or `s3://bucket/prefix`); ConfigError otherwise."""
    parts = urlsplit(url)
    backend = STORAGE_SCHEMES.get(parts.scheme)
    if backend is None and len(parts.scheme) == 1 and os.name == "nt":  # a drive letter
        backend = "local"
    if backend is None:
        raise ConfigError(setting, f"scheme {parts.scheme!r} is not supported; use a local path, file:// or s3://bucket/prefix")
    if backend == "s3":
        if not parts.netloc:
            raise ConfigError(setting, "an s3:// URL needs a bucket: s3://bucket/prefix")
        return StorageLocation("s3", parts.path.strip("/"), bucket=parts.netloc)
    return StorageLocation("local", unquote(parts.path) if parts.scheme == "file" else url)


def _validate_database_url(url: str) -> str:
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise ConfigError("DATABASE_URL", "a SQLite URL is sqlite:///relative/path.db or sqlite:////abs/path.db")
        return url
    if scheme in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg") is None:  # found, not imported: gevent patches first
            raise UnsupportedDatabase("DATABASE_URL", POSTGRES_DRIVER_MISSING)
        return url
    raise UnsupportedDatabase("DATABASE_URL", f"{scheme or url!r} is not supported; use sqlite:///path.db or postgresql://…")


def _validate_fernet_keys(keys: list[str]) -> tuple[str, ...]:
    from cryptography.fernet import Fernet

    for key in keys:
        try:
            Fernet(key.encode())
        except ValueError:
            raise ConfigError(
                "RECEIVER_ENCRYPTION_KEY",
                "each key must be a Fernet key (44 characters, url-safe base64; make one with "
                "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`)",
            ) from None
    return tuple(keys)


def _validate_host(host: str, variable: str = "RECEIVER_ARTIFACT_HOSTS") -> str:
    if "/" in host or "@" in host or " " in host:
        raise ConfigError(variable, f"{host!r} is not a host name or IP literal (no scheme, path or port)")
    return host.strip("[]").lower()


def _validate_notify_url(url: str | None, hosts: tuple[str, ...]) -> str | None:
    """The operator's own service: no SSRF rules (it is often on a private network), but https
    unless it is on loopback or a host listed in RECEIVER_NOTIFY_HOSTS."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise ConfigError(
            "RECEIVER_NOTIFY_URL", "must be an https:// URL without credentials, e.g. https://jobs.example.com/hooks"
        )
    if parts.scheme == "http" and not _is_loopback(parts.hostname) and parts.hostname.lower() not in hosts:
        raise ConfigError(
            "RECEIVER_NOTIFY_URL", "plain http only on loopback or a host listed in RECEIVER_NOTIFY_HOSTS; use https://"
        )
    return url


def _validate_sqs_url(url: str | None) -> str | None:
    """A queue URL as SQS prints it (`https://sqs.<region>.amazonaws.com/<account>/<name>`); http
    only on loopback (a local emulator such as moto)."""
    if url is None:
        return None
    parts = urlsplit(url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username
        or parts.query
        or not _SQS_PATH.fullmatch(parts.path)
    ):
        raise ConfigError(
            "RECEIVER_NOTIFY_SQS_URL", "must be a queue URL, e.g. https://sqs.us-east-1.amazonaws.com/123456789012/batches"
        )
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError("RECEIVER_NOTIFY_SQS_URL", "plain http only on loopback; use the https:// queue URL")
    return url


def _validate_event_bus(bus: str | None) -> str | None:
    if bus is None:
        return None
    if not _EVENT_BUS.fullmatch(bus):
        raise ConfigError(
            "RECEIVER_NOTIFY_EVENT_BUS",
            "must be a bus name (e.g. default) or its arn:aws:events:<region>:<account>:event-bus/<name>",
        )
    return bus


def _validate_notify_secret(secret: str | None, *, required: bool) -> str | None:
    """A Standard Webhooks secret: `whsec_` and the base64 of at least 16 random bytes."""
    if secret is None:
        if required:
            raise ConfigError(
                "RECEIVER_NOTIFY_SECRET", "is required with RECEIVER_NOTIFY_URL: whsec_ and the base64 of 16 or more random bytes"
            )
        return None
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True) if secret.startswith("whsec_") else b""
    except binascii.Error:
        key = b""
    if len(key) < 16:
        raise ConfigError("RECEIVER_NOTIFY_SECRET", "must be whsec_ followed by the base64 of 16 or more random bytes")
    return secret


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

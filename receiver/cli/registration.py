"""`receiver register`: point BatchRouter's delivery webhook at this receiver, and prove it works.

The steps, each a line of the checklist the command prints:

1. the API key is accepted (`GET /v1/auth/account`), the storage is writable, and an S3 bucket aborts
   incomplete multipart uploads (a warning with the fix when it does not);
2. the signing secret is stored in the ledger *before* BatchRouter learns it, so every instance
   accepts a delivery signed with it from the moment BatchRouter starts using it; a new one is
   staged (accepted, not yet current) until step 4 succeeds;
3. a signed self-test delivery is POSTed to the public URL, through whatever TLS front is there, and
   the ledger is read back to confirm *this* receiver recorded it;
4. only then `PUT /v1/auth/account/delivery-webhook` with the URL and the secret (HTTPS only, secret
   8–256 characters, private and metadata hosts refused: docs/batchrouter-api.md, "Registering the
   delivery webhook"), and a new secret becomes current.

Verifying before pointing means a mistyped URL or a receiver on another ledger fails the command
with BatchRouter's webhook untouched: deliveries keep going where they went. Every failure after
the PUT says what BatchRouter now does and how to recover.

Running it again is safe: without `--rotate` the current secret is sent again rather than replaced.
With `--rotate` a new secret becomes current and the previous one stays accepted for
`RECEIVER_SECRET_GRACE_HOURS` (48 h by default, longer than BatchRouter's 24 h of retries), so a
delivery signed before the switch and retried after it still gets in.

Secrets are never printed or logged: the only place they go is the ledger and the PUT body.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import secrets as secrets_module
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import HTTPError as _Urllib3Error
from urllib3.exceptions import MaxRetryError, NewConnectionError, SSLError

from ..config import Settings
from ..errors import APIError, AuthenticationFailed, BadRequest, ConfigError, ReceiverError, StorageError
from ..signature import HEADER, sign

if TYPE_CHECKING:
    from ..batchrouter import BatchRouterClient
    from ..ledger import Ledger
    from ..storage import Storage

#: BatchRouter retries a delivery for 24 h (older docs: 8 tries over 24 h; docs/batchrouter-api.md,
#: "Deliveries"); a grace period shorter than that rejects retries signed with the previous secret.
BATCHROUTER_RETRY_WINDOW_SECONDS = 24 * 3600
#: `secrets.token_urlsafe(32)` is 43 characters; at least 32 are promised (docs/architecture.md,
#: "Behaviour operators rely on").
SECRET_BYTES = 32
#: Web workers cache the accepted secrets for about a second (Ledger.accepted_secrets), so a 401 to
#: the first self-test after a rotation is retried for this long before it counts as a refusal.
SELF_TEST_SIGNATURE_WAIT_SECONDS = 6.0
SELF_TEST_TIMEOUT_SECONDS = 10.0
#: How long a new secret is accepted before it is current: it covers the self-test and the PUT;
#: if `register` stops in between, it lapses on its own and nothing else changed.
STAGED_SECRET_SECONDS = 3600.0

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclasses.dataclass(frozen=True)
class Step:
    """One line of the checklist."""

    status: str  # OK, WARN or FAIL
    label: str
    detail: str = ""

    def line(self) -> str:
        return f"[{self.status:>4}] {self.label}" + (f": {self.detail}" if self.detail else "")


@dataclasses.dataclass
class Checklist:
    """What `register` did, step by step; `failure` is the reason it stopped, if it did."""

    steps: list[Step] = dataclasses.field(default_factory=list)
    failure: str | None = None
    #: A new secret was generated (first registration or --rotate).
    minted: bool = False
    #: How many previous secrets were moved into their grace period.
    retired: int = 0
    event_id: str | None = None
    on_step: Callable[[Step], None] | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def add(self, status: str, label: str, detail: str = "") -> Step:
        step = Step(status, label, detail)
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
        return step

    def unchanged(self) -> None:
        """Say, after a failed check, that BatchRouter was not touched."""
        if self.failure is not None:
            self.failure += "; BatchRouter's webhook was not changed (it is set only after the self-test passes)"

    def fail(self, label: str, detail: str) -> Checklist:
        self.add(FAIL, label, detail)
        self.failure = f"{label}: {detail}"
        return self


# --- the URL ------------------------------------------------------------------------------------------


def validate_hook_url(url: str, *, insecure: bool, source: str = "--url") -> str:
    """The URL BatchRouter will deliver to, or ConfigError naming `source` and the fix.

    BatchRouter only delivers over HTTPS (docs/batchrouter-api.md, "Registering the delivery
    webhook"). Plain http is allowed for a loopback host
    with `insecure`, which is how the emulator is used in development.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(source, "must be an https:// URL, e.g. https://hooks.example.com/hooks/batchrouter")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(source, "must not contain a user name or password")
    if parts.fragment:
        raise ConfigError(source, "must not contain a #fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ConfigError(source, "has an invalid port") from None
    if parts.scheme == "http":
        if not insecure:
            raise ConfigError(
                source, "must be https:// (BatchRouter delivers over HTTPS only); --insecure allows http:// on loopback"
            )
        if not is_loopback(parts.hostname):
            raise ConfigError(
                source,
                "must be https://; plain http:// is allowed only on a loopback host (localhost, 127.0.0.1, ::1) with --insecure",
            )
    return url.strip()


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the steps ----------------------------------------------------------------------------------------


def run(
    settings: Settings,
    url: str,
    *,
    rotate: bool = False,
    ca_file: str | None = None,
    on_step: Callable[[Step], None] | None = None,
    client: BatchRouterClient | None = None,
    ledger: Ledger | None = None,
    storage: Storage | None = None,
) -> Checklist:
    """Register `url` (already checked by :func:`validate_hook_url`) and return the checklist.

    `client`, `ledger` and `storage` default to the ones `settings` describes; the caller closes
    what it passes in, this function closes what it opens.
    """
    from ..batchrouter import BatchRouterClient
    from ..ledger import Ledger
    from ..storage import open_storage

    result = Checklist(on_step=on_step)
    opened: list[Any] = []
    try:
        if client is None:
            client = BatchRouterClient.from_settings(settings)
            opened.append(client)
        if not _check_key(client, result):
            return result
        if storage is None:
            storage = open_storage(settings)
            opened.append(storage)
        if not _check_storage(storage, result):
            return result
        if ledger is None:
            ledger = Ledger.from_settings(settings)
            opened.append(ledger)
        try:
            ledger.create_schema()
            secret, staged = _choose_secret(ledger, rotate)
        except ReceiverError as exc:
            return result.fail("ledger", str(exc))
        result.minted = staged is not None
        # Verify first: the self-test proves the URL reaches this ledger with this secret. Only then
        # is BatchRouter pointed at it, so a wrong URL never takes the deliveries away.
        if not _self_test(url, secret, ledger, ca_file, result):
            result.unchanged()
            return result
        if not _put_webhook(client, url, secret, result):
            return result
        if staged is not None:
            try:
                result.retired = ledger.promote_secret(staged, grace_seconds=settings.web.secret_grace_seconds)
            except ReceiverError as exc:
                until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + STAGED_SECRET_SECONDS))
                result.fail(
                    "ledger",
                    f"BatchRouter now delivers to {url} signed with the new secret, but the ledger could not make it "
                    f"current ({exc}); this receiver accepts it only until about {until}. Run `receiver register --url {url}` "
                    "again before then: it sends BatchRouter the secret the ledger holds as current",
                )
        return result
    finally:
        for thing in reversed(opened):
            try:
                thing.close()
            except Exception:  # closing must not hide the checklist
                pass


def _check_key(client: BatchRouterClient, result: Checklist) -> bool:
    try:
        account = client.get_account()
    except AuthenticationFailed:
        result.fail(
            "API key",
            "refused by BatchRouter (401): check BATCHROUTER_API_KEY, and that a test key goes with BATCHROUTER_API_URL=https://test.api.batchrouter.com",
        )
        return False
    except APIError as exc:
        result.fail("API key", f"could not be checked: {exc}")
        return False
    name = account.get("name") or account.get("id") or account.get("org_id")
    result.add(OK, "API key accepted", f"account {name}" if isinstance(name, str) and name else "")
    return True


def _check_storage(storage: Storage, result: Checklist) -> bool:
    try:
        storage.check()
    except StorageError as exc:
        result.fail("storage", f"not writable: {exc}")
        return False
    except Exception as exc:  # a misconfigured backend must not end in a traceback
        result.fail("storage", f"not writable: {type(exc).__name__}: {exc}")
        return False
    result.add(OK, "storage writable", storage.url)
    abort_rule = storage.check_abort_rule()
    if abort_rule is not None:
        found, detail = abort_rule
        result.add(OK if found else WARN, "bucket aborts incomplete multipart uploads", detail)
    return True


def _choose_secret(ledger: Ledger, rotate: bool) -> tuple[str, int | None]:
    """(secret, the staged row id when it is new).

    A new secret is staged: accepted (so the self-test and BatchRouter's first deliveries get in)
    but not current, until BatchRouter has taken it; then `promote_secret` makes it current and
    moves the previous one into its grace period.
    """
    current = ledger.current_secret()
    if current is not None and not rotate:
        return current, None
    secret = secrets_module.token_urlsafe(SECRET_BYTES)
    return secret, ledger.stage_secret(secret, accepted_for=STAGED_SECRET_SECONDS)


def _put_webhook(client: BatchRouterClient, url: str, secret: str, result: Checklist) -> bool:
    unchanged = "BatchRouter's webhook is unchanged and delivers where it did before"
    try:
        client.set_delivery_webhook(url, secret)
    except AuthenticationFailed:
        result.fail("webhook", f"BatchRouter refused the API key (401) when setting the webhook; {unchanged}")
        return False
    except BadRequest as exc:
        result.fail("webhook", f"BatchRouter refused it (400): {_details(exc)}; {unchanged}")
        return False
    except APIError as exc:
        result.fail(
            "webhook",
            f"not confirmed: {exc}. BatchRouter may or may not have taken it: if it did, it delivers to {url} "
            f"(verified just now) with a secret this receiver accepts; run `receiver register --url {url}` again "
            "to be sure",
        )
        return False
    note = "a new signing secret" if result.minted else "the current signing secret"
    result.add(OK, "webhook set", f"{url}, with {note}")
    return True


def _details(exc: APIError) -> str:
    details = exc.details
    if isinstance(details, dict) and details:
        return "; ".join(f"{field}: {reason}" for field, reason in details.items())
    if isinstance(details, list) and details:
        return "; ".join(str(d) for d in details)
    return str(exc)


# --- the self-test ------------------------------------------------------------------------------------


def self_test_body(now: float | None = None) -> tuple[str, bytes]:
    """A delivery in the envelope form with a unique id and a type nothing acts on (it is `ignored`)."""
    event_id = "evt_selftest_" + secrets_module.token_hex(12)
    body = {"id": event_id, "type": "receiver.selftest", "created": int(now or time.time()), "data": {}}
    return event_id, json.dumps(body, separators=(",", ":")).encode()


def _self_test(url: str, secret: str, ledger: Ledger, ca_file: str | None, result: Checklist) -> bool:
    event_id, body = self_test_body()
    result.event_id = event_id
    headers = {"Content-Type": "application/json", HEADER: sign(secret, body), "User-Agent": "batchrouter-receiver-register"}
    # Certificates verified against the system store or --ca-file; redirects not followed, since
    # BatchRouter is not documented to follow them either.
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=ca_file, retries=False)
    timeout = urllib3.Timeout(connect=SELF_TEST_TIMEOUT_SECONDS, read=SELF_TEST_TIMEOUT_SECONDS)
    secure = urlsplit(url).scheme == "https"
    reach = "reachable over HTTPS" if secure else "reachable (plain http, --insecure)"
    deadline = time.monotonic() + SELF_TEST_SIGNATURE_WAIT_SECONDS
    try:
        while True:
            try:
                response = pool.request("POST", url, body=body, headers=headers, timeout=timeout, redirect=False)
            except (_Urllib3Error, OSError) as exc:
                reason: BaseException | str = exc.reason if isinstance(exc, MaxRetryError) and exc.reason is not None else exc
                if isinstance(reason, NewConnectionError):  # drop urllib3's "HTTPConnection(host=…, port=…): "
                    reason = str(reason).split("): ", 1)[-1]
                if "CERTIFICATE_VERIFY_FAILED" in str(reason):  # an unknown CA, an expired or misnamed certificate
                    result.fail(
                        "certificate",
                        f"the TLS certificate of {url} does not verify ({_short(reason)}); BatchRouter will refuse it too. "
                        "Use a certificate from a public CA, or pass --ca-file for a private CA in a test setup",
                    )
                elif isinstance(reason, SSLError):
                    result.fail("URL", f"the TLS handshake with {url} failed ({_short(reason)}); is HTTPS served on that port?")
                else:
                    result.fail("URL", f"{url} does not answer ({_short(reason)}); check DNS, the firewall and the TLS front")
                return False
            if response.status == 401 and time.monotonic() < deadline:
                time.sleep(0.5)  # another instance may still cache the previous secrets
                continue
            break
    finally:
        pool.clear()
    status = response.status
    if 300 <= status < 400:
        result.fail("URL", f"{url} redirects ({status}) to {response.headers.get('Location')!r}; register the final URL")
        return False
    if status == 401:
        result.add(OK, reach, f"{url} answered")
        result.fail(
            "signature",
            f"{url} answered 401 to a delivery signed with the registered secret: it reaches a receiver that does "
            "not share this ledger (DATABASE_URL), or not a receiver at all",
        )
        return False
    if status != 200:
        said = _short(response.data.decode("utf-8", "replace"))
        if status >= 500:
            hint = "the receiver or the proxy in front of it is failing (is gunicorn running? see /readyz on its port)"
        else:
            hint = "it is not this receiver's POST /hooks/batchrouter"
        result.fail("URL", f"{url} answered {status} to the self-test delivery ({said}): {hint}")
        return False
    result.add(OK, reach, f"{url} answered 200")
    try:
        answer = json.loads(response.data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or answer.get("status") not in ("accepted", "ignored", "duplicate"):
        result.fail(
            "signature", f"{url} answered 200 but not as a receiver does ({_short(response.data.decode('utf-8', 'replace'))})"
        )
        return False
    try:
        recorded = delivery_recorded(ledger, event_id)
    except ReceiverError as exc:
        result.fail("signature", f"the self-test could not be confirmed: {exc}")
        return False
    if not recorded:
        result.fail(
            "signature",
            f"{url} accepted the self-test, but this receiver's ledger has no record of it: the URL reaches "
            "another receiver (a different DATABASE_URL)",
        )
        return False
    result.add(OK, "signature accepted", f"self-test delivery {event_id} recorded in the ledger")
    return True


def delivery_recorded(ledger: Ledger, event_id: str) -> bool:
    """Whether the ledger recorded a delivery with `event_id` (the web side wrote it before its 200)."""
    return ledger.has_delivery(event_id)


def _short(value: object, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the command --------------------------------------------------------------------------------------

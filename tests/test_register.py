"""`receiver register`, secret rotation, and the HTTPS front of infra/ (Caddy in front of gunicorn)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from receiver.cli.supervise import emulator_args
from receiver.ledger import Ledger
from receiver.signature import HEADER, sign

from .conftest import EMULATOR_KEY, ROOT, Emulator, Service, free_port, read_manifest, run_cli, wait_for, wait_http

CADDY = shutil.which("caddy")


# --- fixtures ---------------------------------------------------------------------------------------


class Caddy:
    """`caddy run` with the shipped infra/Caddyfile, its internal CA, proxying to `upstream_port`."""

    def __init__(self, port: int, upstream_port: int, root_ca: Path, service: Service) -> None:
        self.hook = f"https://localhost:{port}/hooks/batchrouter"
        self.upstream_port = upstream_port
        self.root_ca = root_ca
        self.service = service


@pytest.fixture
def caddy(tmp_path: Path) -> Iterator[Caddy]:
    if CADDY is None:
        pytest.skip("caddy is not installed (apt-get install caddy)")
    port, upstream = free_port(), free_port()
    home = tmp_path / "caddy-home"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        # Caddy keeps its CA and certificates under these; never the real home's.
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "CADDY_ADMIN": "off",
        "CADDY_HTTP_PORT": str(free_port()),
        "CADDY_HTTPS_PORT": str(port),
        "RECEIVER_HOSTNAME": "localhost",
        "RECEIVER_TLS": "internal",
        "RECEIVER_UPSTREAM": f"127.0.0.1:{upstream}",
    }
    svc = Service(
        "caddy", [CADDY, "run", "--adapter", "caddyfile", "--config", str(ROOT / "infra" / "Caddyfile")], env, tmp_path
    ).start()
    root_ca = home / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"

    def serving() -> bool:
        assert svc.proc is not None and svc.proc.poll() is None, svc.output()
        if not root_ca.exists():
            return False
        try:  # any answer (a 502 while gunicorn is not up) means TLS with the internal CA works
            requests.get(f"https://localhost:{port}/healthz", verify=str(root_ca), timeout=2)
        except requests.RequestException:
            return False
        return True

    wait_for(serving, timeout=30, what="caddy")
    yield Caddy(port, upstream, root_ca, svc)
    svc.stop()


@pytest.fixture
def emulator(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Emulator]:
    """conftest's emulator, verifying webhook certificates with Caddy's CA when the test uses Caddy."""
    port = free_port()
    args = emulator_args(port, "--retry-delays", "0.2,0.5,1,2,4")
    if "batchrouter_refuses_loopback" in request.fixturenames:  # as the real one does
        args.remove("--allow-private-webhooks")
    if "caddy" in request.fixturenames:
        args += ["--ca-file", str(request.getfixturevalue("caddy").root_ca)]
    svc = Service("emulator", args, dict(os.environ), tmp_path).start()
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", svc.proc)
    yield Emulator(url, svc)
    svc.stop()


@pytest.fixture
def batchrouter_refuses_loopback() -> None:
    """The emulator refuses a loopback webhook with a 400, as BatchRouter itself does."""


def registered_url(emulator: Emulator) -> str | None:
    r = requests.get(f"{emulator.url}/v1/auth/account", headers={"Authorization": f"Bearer {EMULATOR_KEY}"}, timeout=10)
    return r.json()["delivery_webhook"]["url"]


def stored_secrets(env: dict[str, str]) -> tuple[str | None, list]:
    ledger = Ledger(env["DATABASE_URL"])
    try:
        ledger.create_schema()
        return ledger.current_secret(), ledger.secret_info()
    finally:
        ledger.close()


def deliver(hook: str, secret: str) -> int:
    """POST a progress event (nothing is queued) signed with `secret`; the status code."""
    body = json.dumps(
        {"id": "evt_" + os.urandom(8).hex(), "type": "batch.progress", "data": {"batch_id": "batch_r", "status": "processing"}}
    ).encode()
    r = requests.post(hook, data=body, headers={"Content-Type": "application/json", HEADER: sign(secret, body)}, timeout=10)
    return r.status_code


def text(*results) -> str:
    return "".join(r.stdout.decode() + r.stderr.decode() for r in results)


# --- refusals before anything is sent -------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--insecure"]])
def test_register_refuses_plain_http_before_calling_batchrouter(receiver_env, emulator, flags):
    r = run_cli(receiver_env, "register", *flags, "--url", "http://example.com/hooks/batchrouter")
    assert r.returncode == 2, text(r)
    assert "https" in r.stderr.decode()
    assert emulator.stats()["api_requests"] == {}
    assert stored_secrets(receiver_env) == (None, [])


def test_register_needs_a_url(receiver_env, emulator):
    r = run_cli(receiver_env, "register")
    assert r.returncode == 2
    assert "RECEIVER_PUBLIC_URL" in r.stderr.decode()
    assert emulator.stats()["api_requests"] == {}


def test_register_with_a_bad_api_key_fails_on_the_key(receiver_env, emulator):
    env = dict(receiver_env, BATCHROUTER_API_KEY="br_test_not_the_key")
    r = run_cli(env, "register", "--url", "https://hooks.example.com/hooks/batchrouter")
    assert r.returncode == 1, text(r)
    assert "API key" in r.stderr.decode()
    assert "br_test_not_the_key" not in text(r)
    assert "/v1/auth/account/delivery-webhook" not in emulator.stats()["api_requests"]
    assert stored_secrets(receiver_env) == (None, [])


def test_register_reports_batchrouters_validation_error(batchrouter_refuses_loopback, receiver_env, emulator, web):
    r = run_cli(receiver_env, "register", "--insecure", "--url", web.hook)
    assert r.returncode == 1, text(r)
    stderr = r.stderr.decode()
    assert "400" in stderr and "loopback" in stderr and "webhook is unchanged" in stderr
    assert "[  ok] signature accepted" in r.stdout.decode()  # verified first, then refused
    assert registered_url(emulator) is None
    assert stored_secrets(receiver_env)[0] is None  # the staged secret never became current


def test_register_fails_when_the_url_does_not_reach_the_receiver(receiver_env, emulator):
    r = run_cli(receiver_env, "register", "--insecure", "--url", f"http://127.0.0.1:{free_port()}/hooks/batchrouter")
    assert r.returncode == 1, text(r)
    assert "does not answer" in r.stderr.decode()
    assert "webhook was not changed" in r.stderr.decode()
    assert "webhook set" not in r.stdout.decode() and "[FAIL]" not in r.stdout.decode()
    assert "/v1/auth/account/delivery-webhook" not in emulator.stats()["api_requests"]
    assert registered_url(emulator) is None


def test_a_wrong_url_leaves_the_webhook_and_the_secret_as_they_were(receiver_env, emulator, web):
    good = run_cli(receiver_env, "register", "--insecure", "--url", web.hook)
    assert good.returncode == 0, text(good)
    secret, _ = stored_secrets(receiver_env)

    wrong = run_cli(receiver_env, "register", "--rotate", "--insecure", "--url", f"{web.url}/hooks/wrongpath")
    assert wrong.returncode == 1, text(wrong)
    assert "404" in wrong.stderr.decode() and "webhook was not changed" in wrong.stderr.decode()
    assert registered_url(emulator) == web.hook  # deliveries keep going where they did
    current, infos = stored_secrets(receiver_env)
    assert current == secret
    assert [i.expires_at for i in infos if i.expires_at is None] == [None]  # not put into its grace period
    assert deliver(web.hook, secret) == 200


# --- registering against the emulator --------------------------------------------------------------


def test_register_sets_the_webhook_and_passes_its_self_test_and_is_safe_to_repeat(receiver_env, emulator, web):
    first = run_cli(receiver_env, "register", "--insecure", "--url", web.hook)
    assert first.returncode == 0, text(first)
    out = first.stdout.decode()
    for step in ("API key accepted", "storage writable", "webhook set", "reachable", "signature accepted"):
        assert f"[  ok] {step}" in out, out
    secret, infos = stored_secrets(receiver_env)
    assert secret is not None and len(secret) >= 32
    assert len(infos) == 1 and infos[0].expires_at is None
    assert registered_url(emulator) == web.hook

    # Again, this time from RECEIVER_PUBLIC_URL: same secret, still one.
    again = run_cli(dict(receiver_env, RECEIVER_PUBLIC_URL=web.hook), "register", "--insecure")
    assert again.returncode == 0, text(again)
    assert "current signing secret was kept" in again.stdout.decode()
    assert stored_secrets(receiver_env)[0] == secret
    assert len(stored_secrets(receiver_env)[1]) == 1

    logs = text(first, again) + web.service.output()
    assert secret not in logs and EMULATOR_KEY not in logs


def test_a_secret_is_accepted_as_soon_as_it_is_stored(receiver_env, web, secret):
    """Every gunicorn worker caches the secrets for a second; a signature made with a secret stored
    since then is checked against a fresh read instead of being refused."""
    for _ in range(20):  # every worker has just read (and cached) the secrets
        assert deliver(web.hook, secret) == 200
    ledger = Ledger(receiver_env["DATABASE_URL"])
    ledger.add_secret("brand-new-secret-0123456789", grace_seconds=3600)  # what `register --rotate` does
    ledger.close()
    time.sleep(0.1)
    assert [deliver(web.hook, "brand-new-secret-0123456789") for _ in range(20)] == [200] * 20
    assert deliver(web.hook, "never-stored-secret-0123456") == 401


def test_rotation_keeps_the_previous_secret_for_the_grace_period_only(receiver_env, emulator, web):
    env = dict(receiver_env, RECEIVER_SECRET_GRACE_HOURS="0.002")  # 7.2 s
    assert run_cli(env, "register", "--insecure", "--url", web.hook).returncode == 0
    old, _ = stored_secrets(env)

    rotated = run_cli(env, "register", "--insecure", "--url", web.hook, "--rotate")
    assert rotated.returncode == 0, text(rotated)
    assert "previous one stays accepted" in rotated.stdout.decode()
    assert "shorter than BatchRouter's 24 h" in rotated.stdout.decode()
    new, infos = stored_secrets(env)
    assert new != old
    [retiring] = [i for i in infos if i.expires_at is not None]

    # Inside the grace period both secrets get in (a retry BatchRouter signed before the switch).
    assert time.time() < retiring.expires_at - 1, "the rotation took too long for this grace period"
    assert deliver(web.hook, old) == 200
    assert deliver(web.hook, new) == 200
    status = run_cli(env, "status", "--json")
    stored = json.loads(status.stdout)["secrets"]["stored"]
    assert len(stored) == 2
    assert sorted(s["expires_in_seconds"] is None for s in stored) == [False, True]
    assert all(s["age_seconds"] >= 0 for s in stored)
    assert old not in status.stdout.decode() and new not in status.stdout.decode()
    # The emulator signs with the new secret now.
    batch = emulator.create_batch(items=3, status="processing")
    sent = emulator.complete(batch["id"], wait=True)
    assert [a["status"] for a in sent["attempts"]] == [200]

    # After it (and the web workers' one-second cache), only the new one.
    time.sleep(max(0.0, retiring.expires_at - time.time()) + 1.2)
    assert deliver(web.hook, old) == 401
    assert deliver(web.hook, new) == 200
    status = run_cli(env, "status", "--json")
    [current] = json.loads(status.stdout)["secrets"]["stored"]
    assert current["expires_in_seconds"] is None
    assert old not in text(rotated, status) + web.service.output()


# --- HTTPS through Caddy ----------------------------------------------------------------------------


def test_register_and_deliver_over_https_through_caddy(request, caddy, receiver_env, emulator, tmp_path):
    receiver_env.update(PORT=str(caddy.upstream_port), RECEIVER_TRUSTED_PROXIES="1")
    request.getfixturevalue("web")
    request.getfixturevalue("worker")

    # Caddy's internal CA is not in the system store: the self-test says so and fails.
    untrusted = run_cli(receiver_env, "register", "--url", caddy.hook)
    assert untrusted.returncode == 1, text(untrusted)
    assert "certificate" in untrusted.stderr.decode() and "--ca-file" in untrusted.stderr.decode()

    r = run_cli(receiver_env, "register", "--url", caddy.hook, "--ca-file", str(caddy.root_ca))
    assert r.returncode == 0, text(r)
    assert "[  ok] reachable over HTTPS" in r.stdout.decode()
    assert "[  ok] signature accepted" in r.stdout.decode()
    assert registered_url(emulator) == caddy.hook

    # The emulator delivers over HTTPS, verifying Caddy's certificate, and the worker stores it.
    batch = emulator.create_batch(items=40, status="processing")
    emulator.complete(batch["id"])
    manifest = wait_for(lambda: read_manifest(tmp_path / "storage", batch["id"]), timeout=30, what="manifest")
    assert manifest["status"] == "completed"
    attempts = [a for a in emulator.stats()["deliveries"] if a["batch_id"] == batch["id"]]
    assert attempts and attempts[0]["url"] == caddy.hook and attempts[0]["status"] == 200

    # Only the hook and liveness go through the front.
    assert (
        requests.get(caddy.hook.replace("/hooks/batchrouter", "/metrics"), verify=str(caddy.root_ca), timeout=5).status_code
        == 404
    )
    secret, _ = stored_secrets(receiver_env)
    assert secret not in text(untrusted, r) + caddy.service.output()


# --- X-Forwarded-* and the S3 lifecycle check (in process) ---------------------------------------


@pytest.mark.parametrize(
    ("trusted", "scheme", "client", "host"),
    [(0, "http", "127.0.0.1", "localhost"), (1, "https", "203.0.113.9", "hooks.example.com")],
)
def test_forwarded_headers_are_trusted_only_from_the_configured_proxies(tmp_path, trusted, scheme, client, host):
    from flask import jsonify
    from flask import request as flask_request

    from receiver.app import create_app
    from receiver.config import Settings, WebSettings

    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db", storage_url=str(tmp_path / "s"), web=WebSettings(trusted_proxies=trusted)
    )
    app = create_app(settings)

    @app.get("/_probe")  # what the app sees of the request, added by this test only
    def probe():
        return jsonify(scheme=flask_request.scheme, remote_addr=flask_request.remote_addr, host=flask_request.host)

    seen = (
        app.test_client()
        .get(
            "/_probe",
            headers={
                "X-Forwarded-Proto": "https",
                "X-Forwarded-For": "198.51.100.66, 203.0.113.9",
                "X-Forwarded-Host": "hooks.example.com",
            },
            environ_base={"REMOTE_ADDR": "127.0.0.1"},
        )
        .get_json()
    )
    # With one trusted proxy only its own entry counts: the spoofed 198.51.100.66 is ignored.
    assert seen == {"scheme": scheme, "remote_addr": client, "host": host}


def test_s3_check_warns_with_the_fix_when_no_rule_aborts_incomplete_uploads():
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    from receiver.storage.s3 import S3Storage

    from ._moto import aws_test_env

    with aws_test_env(), moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="results")
        storage = S3Storage("results", "batchrouter", client=s3)
        found, detail = storage.check_abort_rule()
        assert not found and "put-bucket-lifecycle-configuration" in detail and "batchrouter/" in detail

        def rule(prefix: str) -> dict:
            return {
                "ID": "abort",
                "Status": "Enabled",
                "Filter": {"Prefix": prefix},
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
            }

        s3.put_bucket_lifecycle_configuration(Bucket="results", LifecycleConfiguration={"Rules": [rule("other/")]})
        assert storage.check_abort_rule()[0] is False
        s3.put_bucket_lifecycle_configuration(Bucket="results", LifecycleConfiguration={"Rules": [rule("")]})
        assert storage.check_abort_rule()[0] is True
        s3.put_bucket_lifecycle_configuration(Bucket="results", LifecycleConfiguration={"Rules": [rule("batchrouter/")]})
        assert storage.check_abort_rule() == (True, "rule abort aborts them after 1 day(s)")


def test_caddy_holds_a_trickling_request_until_it_is_whole(caddy):
    """The shipped Caddyfile buffers request bodies: a client that stalls mid-body never reaches
    gunicorn, so it cannot hold one of its connections (RELIABILITY.md, slow clients)."""
    import socket
    import ssl
    import threading

    upstream = socket.socket()
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    upstream.bind(("127.0.0.1", caddy.upstream_port))
    upstream.listen()
    seen: list[bytes] = []
    reached = threading.Event()  # Caddy opened the upstream request
    arrived = threading.Event()  # ... and it is whole

    def serve() -> None:
        conn, _ = upstream.accept()
        reached.set()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            seen.append(data)
            arrived.set()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    threading.Thread(target=serve, daemon=True).start()
    body = b'{"event": "batch.progress", "batch_id": "bat_trickle"}'
    context = ssl.create_default_context(cafile=str(caddy.root_ca))
    port = int(caddy.hook.split(":")[2].split("/")[0])
    with (
        socket.create_connection(("localhost", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(
            b"POST /hooks/batchrouter HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        assert not reached.wait(2.0), "Caddy opened the upstream request before the body had arrived"
        tls.sendall(body[10:])
        assert arrived.wait(20.0)
        answer = tls.recv(65536)
    upstream.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert seen[0].endswith(body)

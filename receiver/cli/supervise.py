"""`receiver serve`: the web server and the worker as child processes, stopped together.

Two processes rather than threads, because that is what the Procfile runs in production: the same
gunicorn and the same worker, so development exercises the real thing.
"""

from __future__ import annotations

import secrets as secrets_module
import signal
import subprocess
import sys
import time
import urllib.request

from ..config import Settings

EMULATOR_KEY = "br_test_emulator"


def supervise(children: list[subprocess.Popen[bytes]]) -> int:
    """Wait until a child exits or a signal arrives; then stop every child (SIGTERM, then SIGKILL)."""
    stop = {"signal": 0}

    def handle(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    code = 0
    while not stop["signal"]:
        exited = [c for c in children if c.poll() is not None]
        if exited:
            code = exited[0].returncode or 1
            print(
                f"receiver: {exited[0].args[2] if len(exited[0].args) > 2 else exited[0].args} exited ({exited[0].returncode}); stopping",
                file=sys.stderr,
            )
            break
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return code


def start_emulator_for_serve(
    settings: Settings, env: dict[str, str], port: int
) -> tuple[dict[str, str], subprocess.Popen[bytes]]:
    """Start `receiver emulator` on loopback and point the receiver's settings at it."""
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "receiver.emulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-key",
            EMULATOR_KEY,
            "--allow-insecure-webhooks",
            "--allow-private-webhooks",
        ],
        env=env,
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("receiver: the emulator did not start") from None
            time.sleep(0.1)
    env = dict(env)
    env.update(
        {
            "BATCHROUTER_API_URL": url,
            "BATCHROUTER_API_KEY": EMULATOR_KEY,
            "RECEIVER_ARTIFACT_HOSTS": ",".join(filter(None, [env.get("RECEIVER_ARTIFACT_HOSTS", ""), "127.0.0.1"])),
        }
    )
    return env, proc


def register_with_emulator(settings: Settings, hook_url: str) -> None:
    """What `receiver register --insecure` does, without the self-test: a fresh secret for the
    emulator's deliveries, stored in the ledger and given to the emulator."""
    from ..batchrouter import BatchRouterClient
    from ..ledger import Ledger

    secret = secrets_module.token_urlsafe(32)
    ledger = Ledger.from_settings(settings)
    ledger.create_schema()
    ledger.add_secret(secret, grace_seconds=settings.secret_grace_seconds)
    ledger.close()
    client = BatchRouterClient.from_settings(settings)
    try:
        client.set_delivery_webhook(hook_url, secret)
    finally:
        client.close()

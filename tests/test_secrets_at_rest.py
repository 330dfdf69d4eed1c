"""Webhook secrets sealed with RECEIVER_ENCRYPTION_KEY: never in the clear in the database, rotation
to a new key, and a wrong key stopping the process with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from receiver.errors import SecretUnreadable
from receiver.ledger import Ledger

from .conftest import ROOT, make_receiver_env, run_cli

KEY_A, KEY_B = Fernet.generate_key().decode(), Fernet.generate_key().decode()
#: The longest secret config allows (256 characters) must still fit the column once sealed.
SECRET = "s3cret-" + "x" * 249


def open_ledger(url: str, *keys: str) -> Ledger:
    ledger = Ledger(url, encryption_keys=keys)
    ledger.create_schema()
    return ledger


def stored_values(url: str) -> list[str]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        values = list(conn.execute(sa.text("SELECT secret FROM webhook_secrets ORDER BY id")).scalars())
    engine.dispose()
    return values


def test_a_sealed_secret_never_reaches_the_database_in_the_clear(db_url):
    ledger = open_ledger(db_url, KEY_A)
    ledger.add_secret(SECRET, grace_seconds=60)
    ledger.add_secret("second-secret-value", grace_seconds=60)
    assert ledger.current_secret() == "second-secret-value"
    assert ledger.accepted_secrets(max_age=0) == ("second-secret-value", SECRET)
    ledger.close()
    values = stored_values(db_url)
    assert len(values) == 2 and all(v.startswith("fernet:") for v in values)
    assert not any("s3cret" in v or "second-secret" in v for v in values)
    if db_url.startswith("sqlite"):
        path = Path(db_url.split(":///", 1)[1])
        for file in path.parent.glob(path.name + "*"):  # the database, its WAL and shared memory
            assert b"s3cret" not in file.read_bytes() and b"second-secret" not in file.read_bytes()


def test_rotation_reseals_every_secret_under_the_first_key(db_url):
    plain = open_ledger(db_url)  # stored before any key was set: in the clear
    plain.add_secret("plain-old-secret", grace_seconds=60)
    plain.close()
    old = open_ledger(db_url, KEY_A)
    old.add_secret("sealed-under-a", grace_seconds=60)
    old.close()
    both = open_ledger(db_url, KEY_B, KEY_A)  # the new key first, the old one still listed
    assert both.accepted_secrets(max_age=0) == ("sealed-under-a", "plain-old-secret")
    assert both.reseal_secrets() == 2
    both.close()
    assert all(v.startswith("fernet:") for v in stored_values(db_url))
    new = open_ledger(db_url, KEY_B)
    assert new.accepted_secrets(max_age=0) == ("sealed-under-a", "plain-old-secret")
    new.close()
    for keys in ((KEY_A,), ()):
        stale = open_ledger(db_url, *keys)
        with pytest.raises(SecretUnreadable):
            stale.check_secrets()
        stale.close()


def test_the_commands_with_a_wrong_key_and_without_one(tmp_path):
    env = make_receiver_env(tmp_path, api_url="http://127.0.0.1:9")
    ledger = open_ledger(env["DATABASE_URL"], KEY_A)
    ledger.add_secret("sealed-under-a", grace_seconds=60)
    ledger.close()

    def one_line_exit_2(done: subprocess.CompletedProcess[bytes]) -> str:
        assert done.returncode == 2, done.stderr
        lines = done.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert "RECEIVER_ENCRYPTION_KEY" in one_line_exit_2(run_cli({**env, "RECEIVER_ENCRYPTION_KEY": "not-a-key"}, "status"))
    wrong = {**env, "RECEIVER_ENCRYPTION_KEY": KEY_B}
    assert "does not decrypt" in one_line_exit_2(run_cli(wrong, "status"))
    assert "does not decrypt" in one_line_exit_2(run_cli(wrong, "worker"))
    assert "set RECEIVER_ENCRYPTION_KEY" in one_line_exit_2(run_cli(env, "status"))
    web = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "python:receiver.web.gunicorn_conf", "receiver.app:create_app()"],
        env={**wrong, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert "does not decrypt" in one_line_exit_2(web)

    rotated = run_cli({**env, "RECEIVER_ENCRYPTION_KEY": f"{KEY_B},{KEY_A}"}, "db", "rotate-key")
    assert rotated.returncode == 0 and b"1 stored webhook secret" in rotated.stdout
    done = run_cli(wrong, "status")
    assert done.returncode == 0 and b"unencrypted" not in done.stdout


def test_status_says_when_secrets_are_stored_unencrypted(tmp_path):
    env = make_receiver_env(tmp_path, api_url="http://127.0.0.1:9")
    assert run_cli(env, "db", "upgrade").returncode == 0  # status only reads: it never creates a ledger
    done = run_cli(env, "status")
    assert done.returncode == 0 and done.stdout.decode().count("stored unencrypted") == 1

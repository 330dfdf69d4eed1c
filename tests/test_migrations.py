"""The ledger's schema migrations: a ledger from release 0.1.0 upgrades in place, processes that
start together migrate once, and RECEIVER_AUTO_MIGRATE=false refuses an older schema."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from receiver.ledger import RUNNING, Delivery, Ledger
from receiver.ledger.migrate import head
from receiver.ledger.schema import metadata

from .conftest import ROOT, make_receiver_env, run_cli

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def empty_db(db_url) -> str:
    """The URL of an empty database, on each backend (conftest's `db_url`)."""
    return db_url


def engine_for(url: str) -> sa.Engine:
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))


#: What 0.1.0 had written: deliveries, jobs in every state that matters, a current and a retiring secret.
V1_ROWS = {
    "deliveries": [
        {
            "event_id": f"evt_{i}",
            "batch_id": f"bat_{i % 3}",
            "event_type": "batch.completed",
            "status": "completed",
            "outcome": "accepted" if i < 3 else "duplicate",
            "received_at": 1700000000.0 + i,
        }
        for i in range(6)
    ],
    "jobs": [
        {
            "batch_id": "bat_0",
            "state": "stored",
            "attempts": 1,
            "next_attempt_at": 1.0,
            "lease_owner": None,
            "lease_expires_at": None,
            "last_error": None,
            "origin": "webhook",
            "created_at": 1.0,
            "updated_at": 2.0,
            "planned_at": 1.5,
            "stored_at": 2.0,
            "batch_status": "completed",
            "manifest_key": "results/bat_0/manifest.json",
            "bytes": 12345678901,
            "lines": 1000,
            "expected_items": 1000,
            "counts_match": True,
        },
        {
            "batch_id": "bat_1",
            "state": "queued",
            "attempts": 0,
            "next_attempt_at": 1.0,
            "lease_owner": None,
            "lease_expires_at": None,
            "last_error": None,
            "origin": "fetch",
            "created_at": 1.0,
            "updated_at": 1.0,
            "planned_at": None,
            "stored_at": None,
            "batch_status": None,
            "manifest_key": None,
            "bytes": None,
            "lines": None,
            "expected_items": None,
            "counts_match": None,
        },
        {
            "batch_id": "bat_2",
            "state": "dead",
            "attempts": 8,
            "next_attempt_at": 1.0,
            "lease_owner": None,
            "lease_expires_at": None,
            "last_error": "artifact expired",
            "origin": "webhook",
            "created_at": 1.0,
            "updated_at": 3.0,
            "planned_at": 1.2,
            "stored_at": None,
            "batch_status": None,
            "manifest_key": None,
            "bytes": None,
            "lines": None,
            "expected_items": None,
            "counts_match": None,
        },
    ],
    "webhook_secrets": [
        {"id": 1, "secret": "old-secret-0123456789", "created_at": 1.0, "expires_at": 4102444800.0},
        {"id": 2, "secret": "current-secret-0123456789", "created_at": 2.0, "expires_at": None},
    ],
}


def write_v1_ledger(url: str) -> None:
    """A ledger as release 0.1.0 left it: its DDL (captured from its create_all) and rows."""
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    engine = engine_for(url)
    text = (FIXTURES / f"ledger_v1_{dialect}.sql").read_text()
    ddl = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    with engine.begin() as conn:
        for statement in filter(str.strip, ddl.split(";")):
            conn.exec_driver_sql(statement)
        for table, rows in V1_ROWS.items():
            conn.execute(sa.table(table, *(sa.column(c) for c in rows[0])).insert(), rows)
        if dialect == "postgresql":  # 0.1.0 inserted secrets through the sequence
            conn.exec_driver_sql("SELECT setval('webhook_secrets_id_seq', 2)")
    engine.dispose()


def dump(url: str) -> dict[str, list[dict]]:
    """Every row of the 0.1.0 tables, as column -> value (a later revision may add columns)."""
    engine = engine_for(url)
    with engine.connect() as conn:
        out = {t: [dict(r._mapping) for r in conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY 1"))] for t in V1_ROWS}
    engine.dispose()
    return out


def kept(before: dict[str, list[dict]], after: dict[str, list[dict]]) -> bool:
    """Whether every row and value from before is still there after (new columns aside)."""
    return all(
        [{column: row[column] for column in old} for old, row in zip(before[t], after[t])] == before[t]
        and len(after[t]) == len(before[t])
        for t in before
    )


def schema_diff(url: str) -> list:
    engine = engine_for(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    return diff


def test_migrations_build_exactly_the_schema_in_schema_py(empty_db):
    """A table or column added to schema.py without a revision (or the other way round) fails here."""
    Ledger(empty_db).create_schema()
    assert schema_diff(empty_db) == []


def test_a_ledger_from_release_0_1_0_upgrades_with_every_row(empty_db):
    write_v1_ledger(empty_db)
    before = dump(empty_db)
    ledger = Ledger(empty_db)
    assert ledger.schema_revision() == "0001"  # recognised, not yet stamped
    assert ledger.create_schema() == "0001"
    assert ledger.schema_revision() == head()
    assert kept(before, dump(empty_db))
    assert schema_diff(empty_db) == []
    # And the upgraded ledger works: the old secrets sign, the queued job is claimed, ids go on.
    assert ledger.accepted_secrets() == ("current-secret-0123456789", "old-secret-0123456789")
    job = ledger.claim("w1", 30)
    assert job is not None and (job.batch_id, job.state) == ("bat_1", RUNNING)
    ledger.add_secret("newest-secret-0123456789", grace_seconds=60)
    assert ledger.current_secret() == "newest-secret-0123456789"
    assert (
        ledger.record_delivery(
            Delivery(event_id="evt_0", event_type="batch.completed", batch_id="bat_0", status="completed", terminal=True)
        ).outcome
        == "duplicate"
    )
    ledger.close()


@pytest.mark.parametrize("start", ["empty", "old"])
def test_eight_processes_starting_together_migrate_once(empty_db, start, tmp_path):
    if start == "old":
        write_v1_ledger(empty_db)
    before = dump(empty_db) if start == "old" else None
    env = make_receiver_env(tmp_path, api_url="http://127.0.0.1:9", **{"DATABASE_URL": empty_db})
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "receiver", "db", "upgrade"],
            env={**env, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(8)
    ]
    results = [(p.wait(timeout=120), p.stdout.read().decode(), p.stderr.read().decode()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(code == 0 for code, _, _ in results), results
    assert sum("upgraded" in out for _, out, _ in results) <= 1, results
    engine = engine_for(empty_db)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == [head()]
    engine.dispose()
    assert schema_diff(empty_db) == []
    if before is not None:
        assert kept(before, dump(empty_db))


def test_auto_migrate_false_refuses_an_older_schema_in_one_line(tmp_path):
    url = f"sqlite:///{tmp_path}/ledger.db"
    env = {**make_receiver_env(tmp_path, api_url="http://127.0.0.1:9", **{"DATABASE_URL": url}), "RECEIVER_AUTO_MIGRATE": "false"}
    # An existing file with no schema (the oldest schema there is); a missing file is another message,
    # since commands that only read never create a ledger.
    sqlite3.connect(tmp_path / "ledger.db").execute("CREATE TABLE unrelated (x)").connection.close()
    for args in (["status"], ["worker"]):
        done = run_cli(env, *args, timeout=60)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "receiver db upgrade" in lines[0], lines
    web = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "python:receiver.web.gunicorn_conf", "receiver.app:create_app()"],
        env={**env, "PYTHONPATH": str(ROOT), "PORT": "9"},
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert web.returncode == 2, web.stderr
    assert web.stderr.decode().strip().count("\n") == 0 and "receiver db upgrade" in web.stderr.decode()
    assert run_cli(env, "db", "upgrade").returncode == 0
    assert run_cli(env, "db", "current").stdout.decode().startswith(f"{head()} (head)")
    assert run_cli(env, "status").returncode == 0

"""Under gevent (the hook's gunicorn worker), a ledger commit must not stop the process's other
requests: cooperative.blocking_runner() moves it to a native thread. Each check runs in a fresh
interpreter, because gevent's monkey-patching cannot be undone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_TICKS_DURING_A_BLOCKING_CALL = """
from gevent import monkey
monkey.patch_all()
import gevent
from receiver.cooperative import blocking_runner, run_in_place

native_sleep = monkey.get_original("time", "sleep")  # blocks the whole thread, like an fsync
ticks = 0
def tick():
    global ticks
    while True:
        gevent.sleep(0.01)
        ticks += 1
ticker = gevent.spawn(tick)
gevent.sleep(0)
run = {runner}
assert run(lambda: native_sleep(0.3) or 42) == 42
print(ticks)
"""


def _run(script: str, tmp_path: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_outside_gevent_blocking_calls_run_in_place() -> None:
    from receiver.cooperative import blocking_runner, run_in_place

    assert blocking_runner() is run_in_place


def test_under_gevent_the_event_loop_runs_during_a_blocking_call(tmp_path: Path) -> None:
    assert int(_run(_TICKS_DURING_A_BLOCKING_CALL.format(runner="blocking_runner()"), tmp_path)) >= 10
    # The same call in place stops every greenlet: what the runner is there to avoid.
    assert int(_run(_TICKS_DURING_A_BLOCKING_CALL.format(runner="run_in_place"), tmp_path)) <= 1


def test_under_gevent_concurrent_deliveries_share_commits_and_all_land(tmp_path: Path) -> None:
    out = _run(
        f"""
        from gevent import monkey
        monkey.patch_all()
        import gevent, sqlite3
        from receiver.cooperative import blocking_runner
        from receiver.ledger import Delivery, Ledger

        ledger = Ledger("sqlite:///{tmp_path}/l.db", run_blocking=blocking_runner())
        ledger.create_schema()
        def deliver(i):
            terminal = i % 10 == 0
            return ledger.record_delivery(Delivery(event_id=f"evt_{{i % 150}}", event_type="batch.completed" if terminal else "batch.progress",
                                          batch_id=f"bat_{{i}}", status="completed" if terminal else "processing", terminal=terminal))
        results = [g.value for g in gevent.joinall([gevent.spawn(deliver, i) for i in range(200)], raise_error=True)]
        rows = sqlite3.connect("{tmp_path}/l.db").execute("SELECT count(*) FROM deliveries").fetchone()[0]
        jobs = sqlite3.connect("{tmp_path}/l.db").execute("SELECT count(*) FROM jobs").fetchone()[0]
        print(rows, jobs, sum(r.outcome == "duplicate" for r in results))
        """,
        tmp_path,
    )
    rows, jobs, duplicates = map(int, out.split())
    assert (rows, duplicates) == (150, 50)  # event ids 0..149, the last 50 deliveries repeat ones
    assert jobs == 15  # the first 150 deliveries hold the terminal ones: i = 0, 10, ..., 140


def test_under_gevent_requests_ready_together_share_one_commit(tmp_path: Path) -> None:
    """The leader lets the requests that are ready reach the queue before it takes its group
    (cooperative.ready_first); leading at once committed one delivery, then the other nineteen."""
    out = _run(
        f"""
        from gevent import monkey
        monkey.patch_all()
        import gevent
        from receiver.cooperative import blocking_runner
        from receiver.ledger import Delivery, Ledger

        ledger = Ledger("sqlite:///{tmp_path}/l.db", run_blocking=blocking_runner())
        ledger.create_schema()
        sizes, commit = [], ledger._group._commit_group  # a spy: every group still commits
        ledger._group._commit_group = lambda group: (sizes.append(len(group)), commit(group))[1]
        def deliver(i):
            return ledger.record_delivery(Delivery(event_id=f"evt_{{i}}", event_type="batch.progress",
                                          batch_id="bat_1", status="processing", terminal=False))
        results = [g.value for g in gevent.joinall([gevent.spawn(deliver, i) for i in range(20)], raise_error=True)]
        print(sizes, sum(r.outcome == "ignored" for r in results))
        """,
        tmp_path,
    )
    sizes, ignored = out.strip().rsplit(" ", 1)
    assert (sizes, ignored) == ("[20]", "20")


def test_outside_gevent_nothing_waits_for_others() -> None:
    from receiver.cooperative import carry_on, ready_first

    assert ready_first() is carry_on


# --- the hook under gunicorn's gevent worker ------------------------------------------------------

SECRET = "cooperative-secret-0123456789"


def _one_worker_hook(tmp_path: Path, api_url: str, **env: str):  # type: ignore[no-untyped-def]
    """The production gunicorn settings with one worker process, so that every request below is
    served by the same event loop: if a database wait blocked it, /healthz would wait too."""
    from .conftest import Service, make_receiver_env, wait_http

    env = make_receiver_env(tmp_path, api_url, RECEIVER_WEBHOOK_SECRET=SECRET, **env)
    svc = Service(
        "web",
        [sys.executable, "-m", "gunicorn", "-c", "python:receiver.web.gunicorn_conf", "-w", "1", "receiver.app:create_app()"],
        env,
        tmp_path,
    ).start()
    url = f"http://127.0.0.1:{env['PORT']}"
    wait_http(f"{url}/healthz", svc.proc)
    return svc, url


def _deliver_in_background(url: str, event_id: str):  # type: ignore[no-untyped-def]
    import json
    import threading

    import requests

    from receiver.signature import HEADER, sign

    body = json.dumps(
        {"id": event_id, "type": "batch.completed", "data": {"batch_id": "bat_" + event_id, "status": "completed"}}
    ).encode()
    answer: dict[str, object] = {}

    def post() -> None:
        r = requests.post(
            f"{url}/hooks/batchrouter",
            data=body,
            timeout=60,
            headers={"Content-Type": "application/json", HEADER: sign(SECRET, body)},
        )
        answer["status"], answer["body"] = r.status_code, r.json()

    thread = threading.Thread(target=post)
    thread.start()
    return thread, answer


def _health_answers_while(check_waiting, url: str) -> None:  # type: ignore[no-untyped-def]
    import requests

    for _ in range(5):
        assert check_waiting(), "the delivery was not held by the database lock"
        r = requests.get(f"{url}/healthz", timeout=2)  # the hook's event loop is free
        assert r.status_code == 200


def test_a_commit_waiting_for_the_sqlite_lock_does_not_stop_the_process(tmp_path: Path, emulator) -> None:  # type: ignore[no-untyped-def]
    import sqlite3
    import time

    svc, url = _one_worker_hook(tmp_path, emulator.url)
    try:
        holder = sqlite3.connect(tmp_path / "receiver.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another writer holds SQLite's write lock
        thread, answer = _deliver_in_background(url, "evt_held")
        time.sleep(0.5)
        _health_answers_while(thread.is_alive, url)
        holder.execute("COMMIT")
        thread.join(30)
        assert answer == {"status": 200, "body": {"status": "accepted", "event_id": "evt_held"}}
    finally:
        svc.stop()


def test_a_postgresql_commit_waiting_for_a_lock_does_not_stop_the_process(tmp_path: Path, emulator, pg_database) -> None:  # type: ignore[no-untyped-def]
    """psycopg waits cooperatively under gevent (3.1.14+); the hook on PostgreSQL, end to end."""
    import time

    import sqlalchemy as sa

    from receiver.ledger import Ledger

    ledger = Ledger(pg_database)
    ledger.create_schema()
    ledger.close()
    svc, url = _one_worker_hook(tmp_path, emulator.url, DATABASE_URL=pg_database)
    admin = sa.create_engine(pg_database.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with admin.begin() as conn:
            conn.execute(sa.text("LOCK TABLE deliveries IN EXCLUSIVE MODE"))
            thread, answer = _deliver_in_background(url, "evt_pg_held")
            time.sleep(0.5)
            _health_answers_while(thread.is_alive, url)
        thread.join(30)
        assert answer == {"status": 200, "body": {"status": "accepted", "event_id": "evt_pg_held"}}
        thread, answer = _deliver_in_background(url, "evt_pg_held")  # a redelivery
        thread.join(30)
        assert answer == {"status": 200, "body": {"status": "duplicate", "event_id": "evt_pg_held"}}
    finally:
        admin.dispose()
        svc.stop()


def test_a_slow_scrape_on_sqlite_does_not_hold_a_delivery(tmp_path: Path, emulator) -> None:  # type: ignore[no-untyped-def]
    """/metrics reads the ledger on a native thread (Ledger.read), so a scrape holds no request of
    its gunicorn worker. Made slow on purpose (400,000 deliveries in its 24-hour window), the scrape
    is still running when a delivery sent after it began has been answered: an ordering, not a time."""
    import sqlite3
    import threading
    import time

    import requests

    from receiver.ledger import Ledger

    ledger = Ledger(f"sqlite:///{tmp_path}/receiver.db")
    ledger.create_schema()
    ledger.close()
    with sqlite3.connect(tmp_path / "receiver.db") as conn:
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400000) "
            "INSERT INTO deliveries (event_id, batch_id, event_type, status, outcome, received_at) "
            "SELECT 'evt_old_' || i, NULL, 'batch.progress', 'processing', 'ignored', ? - i * 0.1 FROM n",
            (time.time(),),
        )
    svc, url = _one_worker_hook(tmp_path, emulator.url)
    try:
        thread, answer = _deliver_in_background(url, "evt_warm")  # the delivery path, warmed up
        thread.join(30)
        assert answer["status"] == 200
        finished: list[str] = []

        def scrape() -> None:
            r = requests.get(f"{url}/metrics", timeout=120)
            assert r.status_code == 200 and "receiver_jobs" in r.text
            finished.append("scrape")

        scraper = threading.Thread(target=scrape)
        scraper.start()
        time.sleep(0.1)  # the scrape has begun (it takes far longer: see the window above)
        thread, answer = _deliver_in_background(url, "evt_during")
        thread.join(60)
        finished.append("delivery")
        scraper.join(120)
        assert answer == {"status": 200, "body": {"status": "accepted", "event_id": "evt_during"}}
        assert finished == ["delivery", "scrape"]
    finally:
        svc.stop()

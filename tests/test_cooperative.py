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
        [sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
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
        from receiver.ledger import Ledger

        ledger = Ledger("sqlite:///{tmp_path}/l.db", run_blocking=blocking_runner())
        ledger.create_schema()
        def deliver(i):
            terminal = i % 10 == 0
            return ledger.record_delivery(event_id=f"evt_{{i % 150}}", event_type="batch.completed" if terminal else "batch.progress",
                                          batch_id=f"bat_{{i}}", status="completed" if terminal else "processing", terminal=terminal)
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

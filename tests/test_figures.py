"""The figures of history (ledger/counters.py) on SQLite and PostgreSQL: equal to what the old
whole-table aggregates gave, kept by every writer, unchanged by pruning, right after a restart and
across processes, and filled in when an older ledger upgrades."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command

from receiver import metrics
from receiver.errors import RateLimited, StorageUnavailable
from receiver.ledger import Ledger, migrate, reports
from receiver.ledger.schema import job_attempts, jobs, known_batches, notification_deliveries, notifications
from receiver.manifest import Manifest, StoredFile

from .test_ledger import deliver, ledger  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def store(led: Ledger, batch_id: str, *, size: int, lines: int = 10, expected: int = 10, notify: bool = False) -> None:
    job = led.claim("w1", 30, batch_id=batch_id)
    assert job is not None
    results = StoredFile(key=f"results/dt=2026-01-01/batch_id={batch_id}/results.jsonl", bytes=size, sha256="0" * 64, lines=lines)
    stored_at = dt.datetime.fromtimestamp(job.planned_at or time.time(), dt.UTC)
    manifest = Manifest(batch_id, "completed", (results,), stored_at, (), "artifact", expected, {"id": batch_id})
    assert led.mark_stored(batch_id, "w1", manifest, notify=notify)
    metrics.attempt_finished(led, job, "stored", started=time.monotonic() - 1)


def fail(led: Ledger, batch_id: str, exc: BaseException, *, dead: bool) -> None:
    job = led.claim("w1", 30, batch_id=batch_id)
    assert job is not None
    led.mark_failed(batch_id, "w1", str(exc), retry_at=None if dead else time.time() - 1)
    metrics.attempt_finished(led, job, "dead" if dead else "failed", exc)


def history(led: Ledger) -> None:
    """A little of everything the product writes: stored (one with a count mismatch, one announced),
    retried, dead, revived, running, released, forgotten, polled and found by polling."""
    for i in range(8):
        deliver(led, f"evt_{i}", f"bat_{i}")
    store(led, "bat_0", size=5 * MiB, notify=True)
    store(led, "bat_1", size=200 * MiB, lines=9)
    fail(led, "bat_2", RateLimited("slow down", status=429), dead=False)
    store(led, "bat_2", size=1000)
    fail(led, "bat_3", StorageUnavailable("disk full"), dead=True)
    fail(led, "bat_4", RateLimited("slow down", status=429), dead=True)
    deliver(led, "evt_4_again", "bat_4")  # a new terminal delivery revives a dead job
    assert led.claim("w1", 30, batch_id="bat_5") is not None  # running
    assert led.claim("w1", 30, batch_id="bat_6") is not None
    led.release("bat_6", "w1")
    assert led.claim("w1", 30, batch_id="bat_7") is not None
    led.forget_job("bat_7", "w1")
    note = led.claim_notification("n1", 30)
    assert note is not None
    led.notification_sent(note.batch_id, "n1")
    led.watch("bat_polled")
    led.watch("bat_found")
    led.record_poll("bat_polled", None, status="processing")
    led.record_poll("bat_polled", None, status="processing")
    led.record_poll("bat_found", None, status="completed", state="ended")
    with led.begin() as conn:
        conn.execute(known_batches.update().where(known_batches.c.batch_id == "bat_found").values(found_by_poll=True))


def whole_table_figures(led: Ledger) -> dict[str, Any]:
    """What the figures were before counters: aggregates over every row, computed here in Python."""
    with led.connect() as conn:
        rows = conn.execute(sa.select(jobs)).mappings().all()
        attempts = conn.execute(sa.select(job_attempts)).mappings().all()
        known = conn.execute(sa.select(known_batches)).mappings().all()
        sent = conn.execute(sa.select(sa.func.count()).where(notification_deliveries.c.state == "sent")).scalar_one()
    stored = [r for r in rows if r["state"] == "stored"]
    durations = [r["updated_at"] - r["planned_at"] for r in stored if r["planned_at"] is not None]
    sizes = [r["bytes"] for r in stored if r["bytes"] is not None]
    ok = [a for a in attempts if a["outcome"] == "stored" and a["bytes"] is not None and a["seconds"] is not None]
    retries: dict[str, int] = {}
    for a in attempts:
        if a["outcome"] in ("failed", "dead"):
            retries[a["cause"] or "other"] = retries.get(a["cause"] or "other", 0) + 1
    return {
        "jobs": {s: sum(r["state"] == s for r in rows) for s in ("queued", "running", "failed", "stored", "dead")},
        "stored_bytes": sum(r["bytes"] or 0 for r in rows),
        "counts_mismatch": sum(r["counts_match"] is False or r["counts_match"] == 0 for r in rows),
        "duration": _histogram(durations, reports.DURATION_BUCKETS),
        "bytes": _histogram(sizes, reports.BYTES_BUCKETS),
        "retries": retries,
        "downloaded_bytes": sum(a["bytes"] for a in ok),
        "download_seconds": round(sum(a["seconds"] for a in ok), 6),
        "polls": sum(k["polls"] for k in known),
        "found_by_poll": sum(bool(k["found_by_poll"]) for k in known),
        "sent": sent,
    }


def _histogram(values: list[float], bounds: tuple[float, ...]) -> dict[str, Any]:
    return {
        "buckets": [(b, sum(v <= b for v in values)) for b in bounds],
        "count": len(values),
        "sum": round(sum(values), 6),
    }


def counted_figures(led: Ledger) -> dict[str, Any]:
    """The same figures as the ledger now reads them."""
    stats, polling, figures = led.stats(), led.polling_stats(), reports.metric_figures(led)
    return {
        "jobs": stats["jobs"],
        "stored_bytes": stats["stored_bytes"],
        "counts_mismatch": stats["counts_mismatch"],
        "duration": {**figures["duration"], "sum": round(figures["duration"]["sum"], 6)},
        "bytes": {**figures["bytes"], "sum": round(figures["bytes"]["sum"], 6)},
        "retries": figures["retries"],
        "downloaded_bytes": figures["downloaded_bytes"],
        "download_seconds": round(figures["download_seconds"], 6),
        "polls": polling["polls"],
        "found_by_poll": polling["found_by_poll"],
        "sent": stats["notifications"]["states"]["sent"],
    }


def test_counters_equal_the_whole_table_figures(ledger):  # noqa: F811
    history(ledger)
    expected = whole_table_figures(ledger)
    assert expected["jobs"] == {"queued": 3, "running": 1, "failed": 0, "stored": 3, "dead": 1}  # a varied history
    assert expected["retries"] == {"rate_limit": 2, "storage": 1} and expected["polls"] == 3 and expected["sent"] == 1
    assert counted_figures(ledger) == expected
    assert ledger.stats()["notifications"]["states"] == {"pending": 0, "sent": 1, "failed": 0}
    assert ledger.stats()["notifications"]["targets"] == {"webhook": {"pending": 0, "sent": 1, "failed": 0}}


def test_pruning_history_lowers_no_figure_but_a_deleted_job_in_flight_or_dead_leaves_its_state(ledger):  # noqa: F811
    history(ledger)
    before = counted_figures(ledger)
    with ledger.begin() as conn:  # what retention does to history: delete old rows
        conn.execute(jobs.delete().where(jobs.c.state == "stored"))
        conn.execute(job_attempts.delete())
        conn.execute(known_batches.delete())
        conn.execute(notification_deliveries.delete())
        conn.execute(notifications.delete())
    assert counted_figures(ledger) == before
    queued = ledger.claim("w1", 30)
    assert queued is not None
    ledger.forget_job(queued.batch_id, "w1")
    with ledger.begin() as conn:  # a dead job deleted no longer waits for an operator (the alert)
        conn.execute(jobs.delete().where(jobs.c.state == "dead"))
    assert ledger.stats()["jobs"] == {**before["jobs"], "queued": before["jobs"]["queued"] - 1, "dead": 0}


def test_a_restarted_process_reads_the_same_figures(ledger):  # noqa: F811
    history(ledger)
    before = counted_figures(ledger)
    again = Ledger(ledger.url)
    try:
        again.create_schema()
        assert counted_figures(again) == before == whole_table_figures(again)
    finally:
        again.close()


_WRITER = """
import datetime as dt, sys, time
from receiver import metrics
from receiver.errors import RateLimited
from receiver.ledger import Delivery, Ledger, reports
from receiver.manifest import Manifest, StoredFile

url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
led = Ledger(url)
led.create_schema()
seen, went_back = 0, 0
for i in range(n):
    batch = f"bat_{name}_{i}"
    led.record_delivery(Delivery(event_id=f"evt_{batch}", event_type="batch.completed", batch_id=batch, status="completed", terminal=True))
    job = led.claim(name, 30, batch_id=batch)
    if i % 3 == 0:
        led.mark_failed(batch, name, "429", retry_at=time.time() - 1)
        metrics.attempt_finished(led, job, "failed", RateLimited("slow down", status=429))
        job = led.claim(name, 30, batch_id=batch)
    f = StoredFile(key=f"results/{batch}.jsonl", bytes=1000 + i, sha256="0" * 64, lines=1)
    m = Manifest(batch, "completed", (f,), dt.datetime.now(dt.UTC), (), "artifact", 1, {"id": batch})
    led.mark_stored(batch, name, m)
    metrics.attempt_finished(led, job, "stored", started=time.monotonic())
    count = reports.metric_figures(led)["duration"]["count"]  # folds on PostgreSQL, racing the other
    went_back += count < seen
    seen = max(seen, count)
print(went_back)
"""


def test_two_processes_writing_and_reading_at_once_count_every_change(ledger, tmp_path):  # noqa: F811
    """Two processes store batches and read the figures at the same time (on PostgreSQL each read
    folds deltas while the other writes); no figure seen ever goes back, and the totals are exact."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_WRITER))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), ledger.url, name, "60"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["0", "0"]
    figures = counted_figures(ledger)
    assert figures["jobs"]["stored"] == 120 and figures["duration"]["count"] == 120
    assert figures["retries"] == {"rate_limit": 40}
    assert figures["stored_bytes"] == 2 * sum(1000 + i for i in range(60))
    assert figures == whole_table_figures(ledger)


def test_an_upgrade_fills_the_counters_from_the_rows_already_there(ledger):  # noqa: F811
    history(ledger)
    expected = whole_table_figures(ledger)
    with ledger.engine.begin() as conn:
        command.downgrade(migrate._config(conn), "0003")  # a ledger as 0003 left it: no counters
    with ledger.engine.connect() as conn:
        assert not sa.inspect(conn).has_table("counters")
    assert ledger.create_schema() == "0003"
    assert counted_figures(ledger) == expected


def test_job_lists_page_through_the_index_and_search_finds_an_old_batch_by_its_id(ledger):  # noqa: F811
    now = time.time()
    for i in range(25):
        deliver(ledger, f"evt_{i}", f"bat_{i:02d}")
    with ledger.begin() as conn:  # distinct ages, and two jobs changed at the same moment
        for i in range(25):
            conn.execute(jobs.update().where(jobs.c.batch_id == f"bat_{i:02d}").values(updated_at=now - 100 + min(i, 20)))
    seen: list[str] = []
    before = None
    while True:
        page = reports.find_jobs(ledger, limit=10, before=before)
        seen += [j["batch_id"] for j in page]
        if len(page) < 10:
            break
        before = (page[-1]["updated_at"], page[-1]["batch_id"])
    assert seen == [f"bat_{i:02d}" for i in reversed(range(25))]  # newest first, ties by id, none twice
    # A search by part of an id looks through the most recent jobs only; a whole id finds any job.
    assert [j["batch_id"] for j in reports.find_jobs(ledger, search="_0", window=5)] == []
    assert [j["batch_id"] for j in reports.find_jobs(ledger, search="bat_03", window=5)] == ["bat_03"]
    assert [j["batch_id"] for j in reports.find_jobs(ledger, search="_2", window=5)] == [
        "bat_24",
        "bat_23",
        "bat_22",
        "bat_21",
        "bat_20",
    ]


def test_housekeeping_folds_the_counter_deltas_and_no_figure_changes(ledger, tmp_path):  # noqa: F811
    """A ledger nobody scrapes must not pile up PostgreSQL's deltas: each housekeeping round folds them
    (SQLite keeps no deltas: its triggers update the counters in place)."""
    from receiver.config import Settings
    from receiver.jobs.housekeeping import Housekeeping
    from receiver.ledger.schema import counter_deltas
    from receiver.storage.local import LocalStorage

    history(ledger)
    before = whole_table_figures(ledger)

    def deltas() -> int:
        if ledger.dialect != "postgresql":
            return 0
        with ledger.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(counter_deltas)).scalar_one()

    assert (deltas() > 0) == (ledger.dialect == "postgresql")
    settings = Settings(database_url=ledger.url, storage_url=str(tmp_path / "storage"))
    Housekeeping(settings, ledger, LocalStorage(tmp_path / "storage")).tick()
    assert deltas() == 0
    assert counted_figures(ledger) == before

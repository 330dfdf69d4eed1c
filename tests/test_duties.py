"""The worker's background duties (jobs/duty.py, jobs/housekeeping.py) on a real ledger and folder."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from receiver import layout
from receiver.config import Settings
from receiver.jobs.duty import Duty
from receiver.jobs.housekeeping import Housekeeping
from receiver.ledger import Delivery, Ledger
from receiver.storage import storage_from_url


class _Flaky(Duty):
    """Fails its first round, then counts rounds; says it is busy until the third."""

    name = "flaky"

    def __init__(self) -> None:
        super().__init__(interval=60.0)
        self.rounds = 0
        self.third = threading.Event()

    def tick(self) -> bool:
        self.rounds += 1
        if self.rounds == 1:
            raise RuntimeError("a bug in one round")
        if self.rounds == 3:
            self.third.set()
        return self.rounds < 3


def test_a_failing_round_is_logged_and_the_duty_goes_on_until_stopped(caplog) -> None:
    # caplog listens on the root logger, which hears nothing once an earlier test in this process
    # ran configure_logging() (the `receiver` logger stops propagating): listen on it directly.
    receiver_log = logging.getLogger("receiver")
    receiver_log.addHandler(caplog.handler)
    try:
        _fail_one_round_then_stop(caplog)
    finally:
        receiver_log.removeHandler(caplog.handler)


def _fail_one_round_then_stop(caplog) -> None:
    duty = _Flaky()
    duty.start()
    # The failed round waits one interval (60 s) before the next: stop() must cut that wait short.
    deadline = time.monotonic() + 10
    while "flaky: unexpected error" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "flaky: unexpected error" in caplog.text
    duty.stop()
    duty.join(10)
    assert duty._thread is not None and not duty._thread.is_alive()
    assert duty.rounds == 1


def test_a_busy_duty_runs_its_next_round_at_once() -> None:
    duty = _Flaky()
    duty.rounds = 1  # past the failing round
    duty.start()
    assert duty.third.wait(10), "a round that reported more work did not run again at once"
    duty.stop()
    duty.join(10)


def test_housekeeping_removes_abandoned_partials_and_prunes_old_deliveries(tmp_path: Path) -> None:
    settings = Settings.from_mapping(
        {"RECEIVER_STORAGE_URL": str(tmp_path / "storage"), "DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"}
    )
    ledger = Ledger(settings.database_url)
    ledger.create_schema()
    storage = storage_from_url(settings.storage_url)
    key = layout.results_key("b_1", "2026-01-01")
    old, fresh = (tmp_path / "storage" / layout.part_key(key, token) for token in ("w1-1", "w2-1"))
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    long_ago = time.time() - (settings.retention.delivery_days + 1) * 86400
    ledger.record_delivery(
        Delivery(event_id="evt_old", event_type="batch.progress", batch_id="b_1", status="running", terminal=False), now=long_ago
    )
    ledger.record_delivery(
        Delivery(event_id="evt_new", event_type="batch.progress", batch_id="b_1", status="running", terminal=False)
    )
    try:
        housekeeping = Housekeeping(settings, ledger, storage)
        assert housekeeping.tick() is False
        assert not old.exists() and fresh.exists()
        assert not ledger.has_delivery("evt_old") and ledger.has_delivery("evt_new")
    finally:
        ledger.close()


def test_housekeeping_stops_pruning_between_steps_when_the_worker_stops(tmp_path: Path) -> None:
    """A stopped worker's housekeeping ends its prune after the step in hand, leaving the rest of
    the backlog for the next worker's round."""
    from receiver.config import RetentionSettings

    settings = Settings.from_mapping(
        {"RECEIVER_STORAGE_URL": str(tmp_path / "storage"), "DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"}
    )
    ledger = Ledger(settings.database_url)
    ledger.create_schema()
    long_ago = time.time() - (settings.retention.delivery_days + 1) * 86400
    for i in range(30):
        ledger.record_delivery(
            Delivery(event_id=f"evt_{i}", event_type="batch.progress", batch_id=None, status="running", terminal=False),
            now=long_ago,
        )
    try:
        housekeeping = Housekeeping(settings, ledger, storage_from_url(settings.storage_url), step_rows=10)
        housekeeping.stop()
        assert housekeeping.prune() == {"deliveries": 10}
        assert ledger.prune_backlog(RetentionSettings())["deliveries"] == 20
        housekeeping.stopping.clear()  # the next round, on a worker that runs
        assert housekeeping.prune() == {"deliveries": 20}
    finally:
        ledger.close()

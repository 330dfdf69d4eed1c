"""The ledger's guarantees, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import time

import pytest

from receiver.config import RetentionSettings
from receiver.ledger import DEAD, FAILED, QUEUED, RUNNING, STORED, Delivery, Ledger
from receiver.manifest import Manifest, StoredFile


@pytest.fixture
def ledger(db_url):
    """A ledger with its schema, on SQLite and on PostgreSQL (conftest's `db_url`)."""
    led = Ledger(db_url)
    led.create_schema()
    yield led
    led.close()


def deliver(led, event_id, batch_id="bat_1", terminal=True):
    return led.record_delivery(
        Delivery(event_id=event_id, event_type="batch.completed", batch_id=batch_id, status="completed", terminal=terminal)
    )


def test_schema_creation_is_safe_when_processes_race(ledger):
    others = [Ledger(ledger.url) for _ in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda led: led.create_schema(), others))
    for led in others:
        led.close()


def test_concurrent_duplicates_record_once_and_queue_one_job(ledger):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: deliver(ledger, "evt_same"), range(40)))
    assert sorted(r.outcome for r in results) == ["accepted"] + ["duplicate"] * 39
    assert sum(r.job_queued for r in results) == 1
    assert deliver(ledger, "evt_other").outcome == "accepted"
    assert len(ledger.list_jobs()) == 1


def test_only_one_worker_claims_a_job(ledger):
    for i in range(10):
        deliver(ledger, f"evt_{i}", batch_id=f"bat_{i}")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(lambda i: ledger.claim(f"w{i}", 30), range(20)))
    got = [c.batch_id for c in claims if c]
    assert sorted(got) == sorted(f"bat_{i}" for i in range(10))


def test_expired_lease_is_claimed_again_and_old_owner_cannot_finish(ledger):
    deliver(ledger, "evt_1")
    now = time.time()
    first = ledger.claim("w1", 5, now=now)
    assert ledger.claim("w2", 5, now=now + 1) is None
    second = ledger.claim("w2", 5, now=now + 6)
    assert second is not None and second.attempts == 2 and second.planned_at == first.planned_at
    assert ledger.renew({"bat_1": None}, "w1", 5) == {"bat_1"}
    assert not ledger.mark_stored("bat_1", "w1", _manifest("bat_1", lines=1, expected_items=1))
    assert ledger.job("bat_1")["state"] == RUNNING


def test_release_failed_dead_and_revival(ledger):
    deliver(ledger, "evt_1")
    job = ledger.claim("w1", 30)
    ledger.release(job.batch_id, "w1")
    row = ledger.job("bat_1")
    assert (row["state"], row["attempts"], row["lease_owner"]) == (QUEUED, 0, None)
    job = ledger.claim("w1", 30)
    assert ledger.mark_failed("bat_1", "w1", "boom", retry_at=time.time() + 60) == FAILED
    assert ledger.claim("w1", 30) is None  # not due yet
    job = ledger.claim("w1", 30, now=time.time() + 61)
    assert ledger.mark_failed("bat_1", "w1", "gave up", retry_at=None) == DEAD
    assert ledger.stats()["dead"][0]["last_error"] == "gave up"
    assert deliver(ledger, "evt_2").job_queued  # a new terminal event revives a dead job
    job = ledger.claim("w1", 30)
    assert ledger.mark_stored("bat_1", "w1", _manifest("bat_1", lines=2, expected_items=3))
    assert not deliver(ledger, "evt_3").job_queued  # a stored batch is never queued again
    assert not ledger.enqueue("bat_1")
    stats = ledger.stats()
    assert stats["jobs"][STORED] == 1 and stats["counts_mismatch"] == 1


def test_secrets_rotate_with_a_grace_period(ledger):
    now = time.time()
    ledger.add_secret("first-secret", grace_seconds=100, now=now)
    ledger.add_secret("second-secret", grace_seconds=100, now=now + 10)
    assert ledger.accepted_secrets(now=now + 20) == ("second-secret", "first-secret")
    ledger._secret_cache = None
    assert ledger.accepted_secrets(now=now + 200) == ("second-secret",)
    assert ledger.current_secret() == "second-secret"


def test_an_expired_secret_cache_is_refreshed_by_one_caller_at_a_time(ledger):
    now = time.time()
    ledger.add_secret("first-secret", grace_seconds=100, now=now)
    assert ledger.accepted_secrets(now=now) == ("first-secret",)
    ledger.add_secret("second-secret", grace_seconds=100, now=now + 1)
    ledger._secret_cache = (now, ("first-secret",))  # as cached before the rotation
    with ledger._secret_refresh:  # another request is reading the secrets right now
        # ... so this one keeps the previous answer instead of queueing for the database.
        assert ledger.accepted_secrets(now=now + 5) == ("first-secret",)
    assert ledger.accepted_secrets(now=now + 5) == ("second-secret", "first-secret")


def test_delivery_records_are_pruned_but_jobs_kept(ledger):
    old = time.time() - 20 * 86400
    ledger.record_delivery(
        Delivery(event_id="evt_old", event_type="batch.completed", batch_id="bat_1", status="completed", terminal=True), now=old
    )
    assert ledger.prune(RetentionSettings(delivery_days=14))["deliveries"] == 1
    assert ledger.job("bat_1") is not None
    assert deliver(ledger, "evt_old").outcome == "accepted"  # forgotten, but the job row still dedups the batch
    assert len(ledger.list_jobs()) == 1


def test_a_delivery_the_ledger_cannot_store_fails_alone(ledger):
    """Deliveries of several threads share one transaction (the group commit); a bad one among
    them must not fail the rest."""
    from receiver.errors import LedgerUnavailable

    def one(i):
        event_id = "evt_bad\udc00" if i == 5 else f"evt_{i}"
        try:
            return deliver(ledger, event_id, batch_id=f"bat_{i}").outcome
        except LedgerUnavailable:
            return "unavailable"

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, range(12)))
    assert outcomes == ["accepted"] * 5 + ["unavailable"] + ["accepted"] * 6
    assert len(ledger.list_jobs()) == 11


def test_a_group_tells_new_deliveries_from_ones_recorded_before(ledger):
    """A group is one multi-row INSERT; which of its deliveries were new must still be exact, for
    progress events alone (one autocommit statement on SQLite) and with a terminal one among them."""
    from receiver.ledger.group_commit import _Pending
    from receiver.ledger.schema import DeliveryRow

    for i in (0, 3, 6, 9):
        deliver(ledger, f"evt_{i}", terminal=False)
    for terminal_at in (None, 4):
        now = time.time()
        group = [
            _Pending(DeliveryRow(f"evt_{i}", f"bat_{i}", "batch.progress", "processing", "ignored", now), queue_batch=False)
            for i in range(10)
        ]
        if terminal_at is not None:
            group = [
                _Pending(
                    DeliveryRow(f"evt_t{i}", f"bat_{i}", "batch.completed", "completed", "accepted", now),
                    queue_batch=i == terminal_at,
                )
                for i in range(10)
            ] + group
        ledger._group._commit_group(group)
        outcomes = [item.result.outcome for item in group]
        if terminal_at is None:
            assert outcomes == ["duplicate" if i % 3 == 0 else "ignored" for i in range(10)]
        else:
            assert outcomes == ["accepted"] * 10 + ["duplicate"] * 10
            assert [item.result.job_queued for item in group[:10]] == [i == terminal_at for i in range(10)]


# --- the polling fallback -----------------------------------------------------------------------


def test_a_progress_delivery_makes_its_batch_known_and_due_after_one_interval(ledger):
    now = time.time()
    assert deliver(ledger, "evt_p1", batch_id="bat_p", terminal=False).outcome == "ignored"
    assert deliver(ledger, "evt_p2", batch_id="bat_p", terminal=False).outcome == "ignored"
    assert ledger.record_delivery(Delivery(event_id="evt_none", event_type="ping", batch_id=None, status=None, terminal=False))
    [known] = ledger.known()
    assert (known["batch_id"], known["source"], known["state"]) == ("bat_p", "delivery", "watching")
    assert ledger.claim_polls("w1", interval=60, now=now + 30) == []
    assert ledger.claim_polls("w1", interval=60, now=now + 61) == ["bat_p"]
    # Claimed: nobody else polls it until its lease runs out.
    assert ledger.claim_polls("w2", interval=60, now=now + 62, lease_seconds=10) == []
    assert ledger.claim_polls("w2", interval=60, now=now + 61 + 200) == ["bat_p"]


def test_watch_polls_at_once_when_asked_and_queues_an_ended_batch_it_was_told_of(ledger):
    now = time.time()
    ledger.watch("bat_checked", status="processing", now=now)  # `receiver watch`: just asked BatchRouter
    ledger.watch("bat_unchecked", poll_now=True, now=now)  # the status page: nobody asked yet
    assert ledger.claim_polls("w1", interval=300, now=now + 1) == ["bat_unchecked"]
    assert ledger.watch("bat_done", status="completed", ended=True, now=now) == "queued to be stored now"
    assert ledger.watch("bat_done", status="completed", ended=True, now=now) == "already queued"
    assert [j["batch_id"] for j in ledger.list_jobs()] == ["bat_done"]


def test_polls_are_shared_between_workers(ledger):
    now = time.time()
    for i in range(30):
        ledger.watch(f"bat_w{i}", now=now - 100)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        claims = list(pool.map(lambda i: ledger.claim_polls(f"w{i}", interval=60, limit=4, now=now), range(12)))
    got = [b for c in claims for b in c]
    assert sorted(got) == sorted(f"bat_w{i}" for i in range(30))


def test_a_poll_that_finds_the_batch_ended_queues_one_job_and_stops_polling(ledger):
    now = time.time()
    deliver(ledger, "evt_p", batch_id="bat_e", terminal=False)
    [claimed] = ledger.claim_polls("w1", interval=1, now=now + 5)
    assert ledger.record_poll(claimed, "w1", status="completed", state="ended", now=now + 5) is True
    job = ledger.job("bat_e")
    assert (job["state"], job["origin"]) == ("queued", "poll")
    assert ledger.claim_polls("w1", interval=1, now=now + 1000) == []
    # The terminal delivery arriving late finds the job: nothing new is queued.
    assert deliver(ledger, "evt_t", batch_id="bat_e").job_queued is False
    stats = ledger.polling_stats(now + 5)
    assert (stats["watched"], stats["polls"], stats["found_by_poll"]) == (0, 1, 1)


def test_a_delivery_and_a_poll_racing_queue_one_job(ledger):
    now = time.time()
    for i in range(20):
        deliver(ledger, f"evt_p{i}", batch_id=f"bat_r{i}", terminal=False)
    claimed = ledger.claim_polls("w1", interval=1, limit=50, now=now + 5)
    assert len(claimed) == 20

    def poll(batch_id):
        return ledger.record_poll(batch_id, "w1", status="completed", state="ended", now=now + 5)

    def delivery(batch_id):
        return deliver(ledger, f"evt_t_{batch_id}", batch_id=batch_id).job_queued

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        polls = list(pool.map(poll, claimed))
        deliveries = [f.result() for f in [pool.submit(delivery, b) for b in claimed]]
    assert [p + d for p, d in zip(polls, deliveries)] == [1] * 20
    assert len(ledger.list_jobs()) == 20


def test_a_batch_with_a_job_is_not_polled_and_is_ended_by_housekeeping(ledger):
    now = time.time()
    deliver(ledger, "evt_p", batch_id="bat_j", terminal=False)
    deliver(ledger, "evt_t", batch_id="bat_j")
    assert ledger.claim_polls("w1", interval=1, now=now + 100) == []
    assert ledger.polling_stats(now)["watched"] == 0
    assert ledger.end_known_with_jobs(now=now) == 1
    assert ledger.known(("ended",)) == []  # it has a job: `ls` shows the job instead


def test_not_found_stops_polling_and_watch_revives_it(ledger):
    now = time.time()
    ledger.watch("bat_nf", now=now - 100)
    [claimed] = ledger.claim_polls("w1", interval=60, now=now)
    ledger.record_poll(claimed, "w1", status="404 not found", state="not_found", now=now)
    assert ledger.claim_polls("w1", interval=60, now=now + 10_000) == []
    assert [k["state"] for k in ledger.known()] == ["not_found"]
    assert ledger.polling_stats(now)["not_found"] == 1
    ledger.watch("bat_nf", now=now)
    assert [k["state"] for k in ledger.known()] == ["watching"]


def test_released_polls_are_due_at_once_and_a_stale_owner_changes_no_schedule(ledger):
    now = time.time()
    ledger.watch("bat_rel", now=now - 100)
    assert ledger.claim_polls("w1", interval=60, now=now) == ["bat_rel"]
    ledger.release_polls(["bat_rel"], "w1", now=now)
    assert ledger.claim_polls("w2", interval=60, now=now + 1) == ["bat_rel"]
    ledger.record_poll("bat_rel", "w1", status="processing", next_poll_at=now + 2, now=now + 1)  # w1 no longer holds it
    [known] = ledger.known()
    assert (known["poll_owner"], known["polls"]) == ("w2", 0)


def test_refused_deliveries_are_counted_for_24_hours_without_a_write_each(ledger):
    now = time.time()
    for i in range(5):
        ledger.note_refused_delivery(now=now + i * 0.1)  # one write, four counted in memory
    ledger.note_refused_delivery(now=now + 2)  # the next write carries them
    assert ledger.polling_stats(now + 3)["refused_signature_24h"] == 6
    assert ledger.polling_stats(now + 2 * 86400)["refused_signature_24h"] == 0


def _manifest(batch_id: str, *, lines: int, expected_items: int) -> Manifest:
    results = StoredFile(key=f"results/dt=2026-01-01/batch_id={batch_id}/results.jsonl", bytes=10, sha256="0" * 64, lines=lines)
    return Manifest(
        batch_id=batch_id,
        status="completed",
        files=(results,),
        stored_at=dt.datetime.now(dt.UTC),
        event_ids=(),
        source="artifact",
        expected_items=expected_items,
        batch={"id": batch_id},
    )


def test_the_heartbeat_notes_how_far_a_running_attempt_has_come(ledger):
    from receiver.ledger import reports

    deliver(ledger, "evt_1")
    assert ledger.claim("w1", 30) is not None
    assert reports.overview(ledger)["running"][0]["bytes_so_far"] == 0
    assert ledger.renew({"bat_1": 5_000_000}, "w1", 30) == set()
    assert reports.overview(ledger)["running"][0]["bytes_so_far"] == 5_000_000
    assert ledger.renew({"bat_1": 6_000_000}, "w2", 30) == {"bat_1"}  # not ours: nothing written
    assert reports.overview(ledger)["running"][0]["bytes_so_far"] == 5_000_000


# --- retention ------------------------------------------------------------------------------------

DAY = 86400.0


def _age(ledger, table, days, **where):
    """Move a row's timestamps `days` into the past, as time passing would (test set-up only)."""
    from receiver.ledger import schema

    tbl = getattr(schema, table)
    columns = {"jobs": ("created_at", "updated_at"), "notifications": ("created_at",), "known_batches": ("first_seen_at",)}
    ago = time.time() - days * DAY
    with ledger.engine.begin() as conn:
        conn.execute(tbl.update().where(*(tbl.c[k] == v for k, v in where.items())).values({c: ago for c in columns[table]}))
        if table == "notifications":  # and every target's delivery of the event
            d = schema.notification_deliveries
            conn.execute(d.update().where(*(d.c[k] == v for k, v in where.items())).values(retry_from=ago))


def _stored(ledger, batch_id, *, notify=False):
    deliver(ledger, f"evt_{batch_id}", batch_id=batch_id)
    ledger.claim("w1", 30, batch_id=batch_id)
    assert ledger.mark_stored(batch_id, "w1", _manifest(batch_id, lines=1, expected_items=1), notify=notify)


def test_retention_prunes_each_table_past_its_time_and_keeps_what_is_in_flight(ledger):
    from receiver.ledger import reports

    policy = RetentionSettings()  # the defaults: 14, 30, 7, 30, 7 days
    now = time.time()
    for name in ("old", "new"):
        _stored(ledger, f"bat_{name}", notify=True)
    _age(ledger, "jobs", 100, batch_id="bat_old")
    _age(ledger, "notifications", 100, batch_id="bat_old")
    _age(ledger, "known_batches", 100, batch_id="bat_old")
    _stored(ledger, "bat_body", notify=True)
    _age(ledger, "notifications", 10, batch_id="bat_body")  # past the body's 7 days, not the row's 30
    # Not stored: dead (an operator's), failed (retrying), pending event, watched batch: all kept.
    deliver(ledger, "evt_dead", batch_id="bat_dead")
    ledger.claim("w1", 30, batch_id="bat_dead")
    ledger.mark_failed("bat_dead", "w1", "gave up", retry_at=None)
    _age(ledger, "jobs", 400, batch_id="bat_dead")
    _stored(ledger, "bat_pending", notify=True)
    _age(ledger, "notifications", 400, batch_id="bat_pending")
    ledger.watch("bat_watched", now=now - 400 * DAY)
    deliver(ledger, "evt_very_old", batch_id="bat_gone", terminal=False)
    with ledger.engine.begin() as conn:
        from receiver.ledger.schema import deliveries, notification_deliveries

        conn.execute(deliveries.update().where(deliveries.c.event_id == "evt_very_old").values(received_at=now - 15 * DAY))
        sent = notification_deliveries.c.batch_id != "bat_pending"
        conn.execute(notification_deliveries.update().where(sent).values(state="sent"))
    reports.record_attempt(ledger, batch_id="bat_old", attempt=1, outcome=STORED, cause=None, bytes_=1, seconds=1.0)
    ledger.note_refused_delivery(now=now - 8 * DAY)
    ledger.note_refused_delivery(now=now)

    from receiver.ledger import counters

    with ledger.begin() as conn:
        figures = counters.read(conn)
    before = ledger.prune_backlog(policy)
    assert before == {
        "deliveries": 1,
        "job attempts": 0,
        "notification bodies": 2,
        "notification deliveries": 1,
        "notifications": 1,
        "known batches": 1,  # bat_old's, still `watching` (no poller ended it) but it has a job
        "stored jobs": 1,
        "refused deliveries": 1,
    }
    removed = ledger.prune(policy)
    assert removed == before
    with ledger.begin() as conn:
        assert counters.read(conn) == figures  # pruning never lowers a figure (nor raises one)
    assert ledger.prune_backlog(policy) == dict.fromkeys(before, 0)

    assert ledger.job("bat_old") is None and ledger.notification("bat_old") is None
    assert ledger.job("bat_new")["state"] == STORED and ledger.notification("bat_new")["body"]
    assert ledger.notification("bat_body")["body"] == b"" and ledger.notification("bat_body")["webhook_id"]
    assert ledger.job("bat_dead")["state"] == DEAD
    assert ledger.notification("bat_pending")["body"]
    assert sorted(k["batch_id"] for k in ledger.known()) == ["bat_gone", "bat_watched"]  # no job: still polled
    assert not ledger.has_delivery("evt_very_old") and ledger.has_delivery("evt_bat_new")
    assert ledger.polling_stats(now)["refused_signature_24h"] == 1


def test_a_batch_whose_rows_were_pruned_is_queued_again_by_its_next_delivery(ledger):
    """The ledger forgets; the worker then finds the manifest in storage and adopts it
    (tests/test_retention.py runs that whole path and counts the downloads)."""

    _stored(ledger, "bat_1")
    ledger.end_known_with_jobs()
    for table in ("jobs", "known_batches"):
        _age(ledger, table, 100, batch_id="bat_1")
    with ledger.engine.begin() as conn:
        from receiver.ledger.schema import deliveries

        conn.execute(deliveries.update().values(received_at=time.time() - 100 * DAY))
    assert ledger.prune(RetentionSettings()) == {
        "deliveries": 1,
        "job attempts": 0,
        "notification bodies": 0,
        "notification deliveries": 0,
        "notifications": 0,
        "known batches": 1,
        "stored jobs": 1,
        "refused deliveries": 0,
    }
    late = deliver(ledger, "evt_bat_1", batch_id="bat_1")  # BatchRouter's redelivery, or a replay
    assert (late.outcome, late.job_queued) == ("accepted", True)
    assert ledger.claim("w1", 30).batch_id == "bat_1"


def test_prune_removes_a_backlog_in_small_steps(ledger):
    from receiver.ledger.retention import rules

    old = time.time() - 20 * DAY
    for i in range(25):
        deliver(ledger, f"evt_{i}", batch_id=None, terminal=False)
    with ledger.engine.begin() as conn:
        from receiver.ledger.schema import deliveries

        conn.execute(deliveries.update().values(received_at=old))
    rule = rules(RetentionSettings(), time.time())[0]
    assert rule.name == "deliveries"
    assert [ledger.prune_step(rule, limit=10) for _ in range(4)] == [10, 10, 5, 0]
    for i in range(25, 50):
        deliver(ledger, f"evt_{i}", batch_id=None, terminal=False)
    with ledger.engine.begin() as conn:
        conn.execute(deliveries.update().values(received_at=old))
    steps = [(r.name, n) for r, n in ledger.prune_steps(RetentionSettings(), limit=10) if r.name == "deliveries"]
    assert steps == [("deliveries", 10), ("deliveries", 10), ("deliveries", 5)]


def test_prune_pauses_after_each_step_and_stops_when_the_pause_says_so(ledger):
    """The one prune loop: `pause` hears how long each step took (0 after an empty one) and ends
    the prune by answering False (the worker stopping); what was removed so far is reported."""
    from receiver.ledger.retention import rules

    for i in range(35):
        deliver(ledger, f"evt_{i}", batch_id=None, terminal=False)
    with ledger.engine.begin() as conn:
        from receiver.ledger.schema import deliveries

        conn.execute(deliveries.update().values(received_at=time.time() - 20 * DAY))
    heard: list[float] = []

    def pause(step_seconds):
        heard.append(step_seconds)
        return sum(1 for s in heard if s) < 2  # stop after the second step that removed rows

    removed = ledger.prune(RetentionSettings(), limit=10, pause=pause)
    assert removed["deliveries"] == 20 and sum(removed.values()) == 20
    # Every rule once (deliveries removed 10, the rest nothing), then deliveries again: stopped there.
    assert [s > 0 for s in heard] == [True] + [False] * (len(rules(RetentionSettings(), time.time())) - 1) + [True]
    assert ledger.prune_backlog(RetentionSettings())["deliveries"] == 15


def test_a_replay_after_the_body_was_dropped_rebuilds_it_from_the_manifest(ledger):
    import json

    _stored(ledger, "bat_1", notify=True)
    first = ledger.notification("bat_1")
    with ledger.engine.begin() as conn:
        from receiver.ledger.schema import notification_deliveries, notifications

        conn.execute(notification_deliveries.update().values(state="sent"))
        conn.execute(notifications.update().values(created_at=time.time() - 8 * DAY))
    assert ledger.prune(RetentionSettings())["notification bodies"] == 1
    assert not ledger.replay_notification("bat_1")  # no manifest to rebuild from: an empty body is never sent
    manifest = _manifest("bat_1", lines=1, expected_items=1)
    assert not ledger.replay_notification("bat_1", manifest=lambda: None)  # its manifest is gone too
    assert ledger.replay_notification("bat_1", manifest=lambda: manifest)
    event = ledger.claim_notification("w1", 30)
    assert event.webhook_id == first["webhook_id"]
    assert json.loads(event.body)["data"]["batch_id"] == "bat_1"


def test_table_sizes_name_every_table_with_rows_and_bytes(ledger):
    _stored(ledger, "bat_1", notify=True)
    sizes = {s.table: s for s in ledger.table_sizes()}
    assert {"deliveries", "jobs", "notifications", "known_batches", "job_attempts", "refused_deliveries"} <= set(sizes)
    assert sizes["jobs"].rows == 1 and sizes["notifications"].rows == 1 and sizes["deliveries"].rows == 1
    assert all(s.bytes is None or s.bytes > 0 for s in sizes.values())
    assert sizes["jobs"].bytes  # dbstat is in Python's SQLite; PostgreSQL always knows


def test_an_event_written_again_after_pruning_keeps_its_webhook_id(ledger):
    """A late delivery of a pruned batch makes the worker adopt its manifest, which writes its
    event again: with the webhook-id the consumer already saw, so it deduplicates it."""

    _stored(ledger, "bat_1", notify=True)
    first = ledger.notification("bat_1")["webhook_id"]
    with ledger.engine.begin() as conn:
        from receiver.ledger.schema import notification_deliveries, notifications

        ago = time.time() - 40 * DAY
        conn.execute(notification_deliveries.update().values(state="sent", retry_from=ago))
        conn.execute(notifications.update().values(created_at=ago))
    assert ledger.prune(RetentionSettings())["notifications"] == 1
    assert ledger.notification("bat_1") is None
    assert ledger.add_notification("bat_1", _manifest_at("bat_1", ledger))
    assert ledger.notification("bat_1")["webhook_id"] == first


def _manifest_at(batch_id, ledger):
    """The manifest `_stored` published, read back as adoption reads it (same stored_at)."""
    stored_at = dt.datetime.fromtimestamp(ledger.job(batch_id)["stored_at"], dt.UTC)
    return dataclasses.replace(_manifest(batch_id, lines=1, expected_items=1), stored_at=stored_at)

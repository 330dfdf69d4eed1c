"""The status page's and the metrics' ledger queries on both backends (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import time

from receiver import metrics
from receiver.errors import ArtifactExpired, DownloadFailed, RateLimited, StorageUnavailable
from receiver.ledger import reports
from receiver.manifest import Manifest, StoredFile

from .test_ledger import deliver, ledger  # noqa: F401  (fixture)


def test_figures_overview_and_search(ledger):  # noqa: F811
    now = time.time()
    deliver(ledger, "evt_a", "bat_a_1")
    deliver(ledger, "evt_b", "bat_b%2")
    deliver(ledger, "evt_c", "bat_c_3")
    job = ledger.claim("w1", 30, batch_id="bat_a_1")
    results = StoredFile(
        key="results/dt=2026-01-01/batch_id=bat_a_1/results.jsonl", bytes=5 * 1024 * 1024, sha256="0" * 64, lines=10
    )
    stored_at = dt.datetime.fromtimestamp(job.planned_at, dt.UTC)
    manifest = Manifest("bat_a_1", "completed", (results,), stored_at, (), "artifact", 10, {"id": "bat_a_1"})
    ledger.mark_stored("bat_a_1", "w1", manifest)
    metrics.attempt_finished(ledger, job, "stored", started=time.monotonic() - 2)
    failed = ledger.claim("w1", 30, batch_id="bat_b%2")
    ledger.mark_failed("bat_b%2", "w1", "DownloadFailed: answered 503", retry_at=None)
    metrics.attempt_finished(ledger, failed, "dead", DownloadFailed("artifact host 'h' answered 503", status=503))

    figures = reports.metric_figures(ledger)
    assert figures["duration"]["count"] == 1
    assert figures["bytes"]["count"] == 1 and figures["bytes"]["sum"] == 5 * 1024 * 1024
    assert dict(figures["bytes"]["buckets"])[10 * 1024**2] == 1 and dict(figures["bytes"]["buckets"])[1024**2] == 0
    assert figures["retries"] == {"server_error": 1}
    assert figures["downloaded_bytes"] == 5 * 1024 * 1024 and figures["download_seconds"] >= 2
    assert figures["last_stored_at"] >= now - 5
    assert 0 <= figures["oldest_queued_age"] < 60  # bat_c_3 is due and waiting

    view = reports.overview(ledger)
    assert view["jobs"]["stored"] == view["dead"] == view["queue_depth"] == 1
    assert view["deliveries"]["hour"] == {"accepted": 3}

    # Search is a plain substring: % and _ are not wildcards.
    assert [j["batch_id"] for j in reports.find_jobs(ledger, search="b%")] == ["bat_b%2"]
    assert [j["batch_id"] for j in reports.find_jobs(ledger, search="_c_")] == ["bat_c_3"]
    assert [j["batch_id"] for j in reports.find_jobs(ledger, state="dead")] == ["bat_b%2"]
    detail = reports.job_detail(ledger, "bat_b%2")
    assert [e["event_id"] for e in detail["events"]] == ["evt_b"]
    assert [(a["outcome"], a["cause"]) for a in detail["attempts"]] == [("dead", "server_error")]
    assert reports.job_detail(ledger, "bat_missing") is None


def test_retry_causes():
    assert metrics.cause_of(RateLimited("slow down", status=429)) == "rate_limit"
    assert metrics.cause_of(DownloadFailed("artifact host 'h' answered 429", status=429)) == "rate_limit"
    assert metrics.cause_of(DownloadFailed("artifact host 'h' answered 502", status=502)) == "server_error"
    # The status decides, not the words: a host name with 502 in it is no server error.
    assert metrics.cause_of(DownloadFailed("cannot reach artifact host 'h502.example': TimeoutError")) == "network"
    assert metrics.cause_of(DownloadFailed("the artifact changed while it was being downloaded")) == "network"
    assert metrics.cause_of(ArtifactExpired("expired")) == "expired_url"
    assert metrics.cause_of(StorageUnavailable("disk full")) == "storage"
    assert metrics.cause_of(ValueError("a bug")) == "other"

"""Prometheus metrics, correct under several gunicorn workers and any number of worker processes.

Counters live in prometheus-client's multiprocess mode when `PROMETHEUS_MULTIPROC_DIR` is set (the
gunicorn config sets it), so `/metrics` sums every worker. Queue and job figures are read from the
ledger at scrape time: they are shared state, and every instance reports the same truth.

The job runner's figures (durations, bytes per job, retries by cause, throughput) go through the
ledger too: the worker calls :func:`attempt_finished` once per attempt, which adds a row to
`job_attempts`, and the web's `/metrics` derives counters and histograms from the rows. So there
is one scrape target however many worker processes run on however many hosts, and a restarted
worker loses nothing (README, "Operating").
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import errors
from .config import NOTIFY_TARGETS

if TYPE_CHECKING:
    from .ledger import Job, Ledger

log = logging.getLogger(__name__)

#: Why an attempt failed, as `receiver_job_retries_total{cause=…}` counts it.
CAUSES = ("rate_limit", "server_error", "network", "expired_url", "storage", "not_terminal", "other")

DELIVERIES = Counter(
    "receiver_deliveries_total",
    "Deliveries answered, by outcome (accepted, duplicate, ignored, invalid, unauthorized, unavailable).",
    ["outcome"],
)


class LedgerCollector(Collector):
    """Job counts by state and stored bytes, read from the ledger on each scrape."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = self._stats()
        except Exception:  # a scrape must not fail because the ledger is down; /readyz says so
            return
        jobs = GaugeMetricFamily("receiver_jobs", "Jobs in the ledger by state.", labels=["state"])
        for state, count in stats["jobs"].items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("receiver_queue_depth", "Jobs waiting to run (queued or retrying).", value=stats["queue_depth"])
        yield GaugeMetricFamily(
            "receiver_counts_mismatch_batches",
            "Stored batches whose line count differs from the batch's item count.",
            value=stats["counts_mismatch"],
        )
        yield GaugeMetricFamily("receiver_stored_bytes", "Bytes of results stored.", value=stats["stored_bytes"])
        yield from _notification_metrics(stats.get("notifications"))
        yield from _polling_metrics(stats.get("polling"))
        last = stats["last_delivery"]
        if last:
            yield GaugeMetricFamily(
                "receiver_last_delivery_timestamp_seconds", "When the last delivery was recorded.", value=last["received_at"]
            )


def _notification_metrics(notifications: dict[str, Any] | None) -> Iterator[GaugeMetricFamily]:
    """Deliveries of batch.stored events per target (`webhook`, `sqs`, `eventbridge`); every target
    has its series, 0 when it has no delivery, so alert rules never meet an absent one."""
    if not notifications:
        return
    pending = GaugeMetricFamily(
        "receiver_notifications_pending", "batch.stored events a target has not yet accepted.", labels=["target"]
    )
    failed = GaugeMetricFamily(
        "receiver_notifications_failed", "batch.stored events given up after their retry window, or rejected.", labels=["target"]
    )
    for target in dict.fromkeys([*NOTIFY_TARGETS, *notifications["targets"]]):
        counts = notifications["targets"].get(target, {})
        pending.add_metric([target], counts.get("pending", 0))
        failed.add_metric([target], counts.get("failed", 0))
    yield pending
    yield failed


def _polling_metrics(polling: dict[str, Any] | None) -> Iterator[GaugeMetricFamily]:
    """The polling fallback: what it watches, what it found, and deliveries refused (a wrong secret)."""
    if not polling:
        return
    yield GaugeMetricFamily(
        "receiver_watched_batches", "Known batches not yet ended, polled until they end.", value=polling["watched"]
    )
    if polling["oldest_watched_age_seconds"] is not None:
        yield GaugeMetricFamily(
            "receiver_oldest_watched_batch_age_seconds",
            "Age of the oldest watched batch.",
            value=polling["oldest_watched_age_seconds"],
        )
    yield GaugeMetricFamily(
        "receiver_not_found_batches", "Known batches BatchRouter answered 404 for.", value=polling["not_found"]
    )
    yield GaugeMetricFamily("receiver_batch_polls", "Polls of known batches made (GET /v1/batches/{id}).", value=polling["polls"])
    yield GaugeMetricFamily(
        "receiver_batches_found_by_polling",
        "Batches queued by polling because no terminal delivery arrived.",
        value=polling["found_by_poll"],
    )
    yield GaugeMetricFamily(
        "receiver_refused_signature_deliveries_24h",
        "Deliveries refused for a bad signature in the last 24 hours.",
        value=polling["refused_signature_24h"],
    )


class JobFiguresCollector(Collector):
    """The job runner's figures, derived from ledger rows (reports.metric_figures) on each scrape."""

    def __init__(self, figures: Callable[[], dict[str, Any]]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        try:
            f = self._figures()
        except Exception:  # as LedgerCollector: the scrape still answers, /readyz says why
            return
        yield GaugeMetricFamily(
            "receiver_oldest_queued_job_age_seconds",
            "How long the longest-waiting due job has waited for a worker (0 when none waits).",
            value=f["oldest_queued_age"],
        )
        yield GaugeMetricFamily(
            "receiver_last_stored_timestamp_seconds",
            "When the last batch was stored (0 when none ever was).",
            value=f["last_stored_at"],
        )
        yield _histogram("receiver_job_duration_seconds", "Seconds from a job's first attempt to stored.", f["duration"])
        yield _histogram("receiver_job_bytes", "Bytes stored per job.", f["bytes"])
        retries = CounterMetricFamily(
            "receiver_job_retries", "Failed job attempts (retried or dead), by cause.", labels=["cause"]
        )
        for cause in CAUSES:
            retries.add_metric([cause], f["retries"].get(cause, 0))
        yield retries
        yield CounterMetricFamily(
            "receiver_downloaded_bytes", "Bytes stored by successful attempts.", value=f["downloaded_bytes"]
        )
        yield CounterMetricFamily(
            "receiver_download_seconds",
            "Seconds spent by successful attempts (throughput: bytes over seconds).",
            value=f["download_seconds"],
        )


class ReadinessCollector(Collector):
    """`receiver_ready{check}`: 1 when /readyz's check passes, 0 when it fails."""

    def __init__(self, checks: Callable[[], dict[str, str]]) -> None:
        self._checks = checks

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready = GaugeMetricFamily(
            "receiver_ready", "Whether the ledger and the storage are reachable (1) or not (0).", labels=["check"]
        )
        for check, result in self._checks().items():
            ready.add_metric([check], 1.0 if result == "ok" else 0.0)
        yield ready


def _histogram(name: str, documentation: str, h: dict[str, Any]) -> HistogramMetricFamily:
    buckets = [(_le(bound), float(n)) for bound, n in h["buckets"]] + [("+Inf", float(h["count"]))]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=h["sum"])


def _le(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else str(bound)


def render(
    stats: Callable[[], dict[str, Any]],
    figures: Callable[[], dict[str, Any]] | None = None,
    checks: Callable[[], dict[str, str]] | None = None,
) -> bytes:
    """The exposition text: every worker's counters plus the ledger's figures."""
    registry = _counters()
    registry.register(LedgerCollector(stats))
    if figures is not None:
        registry.register(JobFiguresCollector(figures))
    if checks is not None:
        registry.register(ReadinessCollector(checks))
    return generate_latest(registry)


def _counters() -> CollectorRegistry:
    """A registry of this process's counters, or every gunicorn worker's in multiprocess mode."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # prometheus-client's own switch
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(DELIVERIES)
    return registry


def signature_failures() -> int:
    """Deliveries refused for their signature since the web server started, summed over its workers.

    Read from the counter, not the ledger: writing a row per refused request would let anyone
    without the secret write to the database.
    """
    value = _counters().get_sample_value("receiver_deliveries_total", {"outcome": "unauthorized"})
    return int(value or 0)


# --- the worker's hook ------------------------------------------------------------------------------


def attempt_finished(
    ledger: Ledger, job: Job, outcome: str, exc: BaseException | None = None, started: float | None = None
) -> None:
    """Count one finished attempt (`stored`, `failed` or `dead`) in the ledger; never raises.

    `started` is the attempt's `time.monotonic()` at claim, for throughput.
    """
    from .ledger import reports

    try:
        size = None
        if outcome == "stored":
            row = ledger.job(job.batch_id)
            size = row["bytes"] if row else None
        reports.record_attempt(
            ledger,
            batch_id=job.batch_id,
            attempt=job.attempts,
            outcome=outcome,
            cause=None if exc is None else cause_of(exc),
            bytes_=size,
            seconds=None if started is None else time.monotonic() - started,
        )
    except Exception as error:  # a metric must never fail a job
        log.warning("job %s: attempt not counted: %s", job.batch_id, error)


def cause_of(exc: BaseException) -> str:
    """The retry cause of a failed attempt, from the exception's class (and status, when it has one)."""
    if isinstance(exc, errors.RateLimited):
        return "rate_limit"
    if isinstance(exc, errors.ArtifactExpired):
        return "expired_url"
    if isinstance(exc, errors.StorageError):
        return "storage"
    if isinstance(exc, errors.BatchNotTerminal):
        return "not_terminal"
    if isinstance(exc, errors.APITransientError | errors.DownloadFailed):
        status = exc.status or 0
        return "server_error" if status >= 500 else "rate_limit" if status == 429 else "network"
    if isinstance(exc, errors.TransferError | OSError):
        return "network"
    return "other"

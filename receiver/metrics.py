"""Prometheus metrics, correct under several gunicorn workers.

Counters live in prometheus-client's multiprocess mode when `PROMETHEUS_MULTIPROC_DIR` is set (the
gunicorn config sets it), so `/metrics` sums every worker. Queue and job figures are read from the
ledger at scrape time: they are shared state, and every instance reports the same truth.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
        notifications = stats.get("notifications")
        if notifications:
            states = notifications["states"]
            yield GaugeMetricFamily(
                "receiver_notifications_pending", "batch.stored events not yet acknowledged by a 2xx.", value=states["pending"]
            )
            yield GaugeMetricFamily(
                "receiver_notifications_failed", "batch.stored events given up after their retry window.", value=states["failed"]
            )
        last = stats["last_delivery"]
        if last:
            yield GaugeMetricFamily(
                "receiver_last_delivery_timestamp_seconds", "When the last delivery was recorded.", value=last["received_at"]
            )


def render(stats: Callable[[], dict[str, Any]]) -> bytes:
    """The exposition text: every worker's counters plus the ledger's figures."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # prometheus-client's own switch
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(DELIVERIES)
    registry.register(LedgerCollector(stats))
    return generate_latest(registry)

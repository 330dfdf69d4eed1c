"""Ledger size with and without retention: history built through the ledger's own code, then pruned.

Each batch gets what production writes (issue #20's mix): two progress deliveries and a terminal
one, a job claimed and stored with its `batch.stored` event sent, 1.27 attempts, a known-batch row.
The batches are spread evenly over `--days` of history (default 120, past every default retention),
so after `prune` the ledger holds what a steady `batches / days` a day leaves with the defaults;
the report scales that to 10,000 batches a day.

    python bench/bench_retention.py --batches 20000                      # SQLite in a temp folder
    python bench/bench_retention.py --database-url postgresql://…/db     # an empty PostgreSQL database
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time

import sqlalchemy as sa

from receiver.config import RetentionSettings
from receiver.ledger import Delivery, Ledger, reports
from receiver.ledger.schema import jobs, notification_deliveries, notifications
from receiver.manifest import Manifest, StoredFile

DAY = 86400.0
PER_DAY = 10_000


def _manifest(batch_id: str, stored_at: float) -> Manifest:
    """A manifest the size production writes: one results file and the batch object as returned."""
    moment = dt.datetime.fromtimestamp(stored_at, dt.UTC)
    day = moment.strftime("%Y-%m-%d")
    results = StoredFile(f"results/dt={day}/batch_id={batch_id}/results.jsonl", 1_234_567, "ab" * 32, 1000)
    batch = {
        "id": batch_id,
        "object": "batch",
        "status": "completed",
        "model": "router-large-2026-06",
        "created_at": int(stored_at) - 3600,
        "completed_at": int(stored_at),
        "request_counts": {"total": 1000, "completed": 1000, "failed": 0},
        "metadata": {"customer": "acme", "pipeline": "nightly-enrichment"},
    }
    return Manifest(batch_id, "completed", (results,), moment, (f"evt_{batch_id}_t",), "artifact", 1000, batch)


def build(ledger: Ledger, batches: int, days: float, now: float) -> None:
    """`batches` batches, the oldest `days` ago, each through the calls the hook and worker make."""
    for i in range(batches):
        batch_id = f"bat_{i:08d}"
        at = now - days * DAY * (1 - i / batches)
        for n, (kind, terminal) in enumerate((("batch.created", False), ("batch.progress", False), ("batch.completed", True))):
            ledger.record_delivery(
                Delivery(f"evt_{batch_id}_{n}", kind, batch_id, "completed" if terminal else "processing", terminal),
                now=at + n,
            )
        job = ledger.claim("bench", 60, batch_id=batch_id, now=at + 3)
        assert job is not None
        if i % 100 < 27:  # 1.27 attempts a batch
            reports.record_attempt(
                ledger, batch_id=batch_id, attempt=1, outcome="failed", cause="server_error", bytes_=None, seconds=0.5, now=at + 4
            )
        ledger.mark_stored(batch_id, "bench", _manifest(batch_id, at + 5), notify=True)
        reports.record_attempt(
            ledger, batch_id=batch_id, attempt=1, outcome="stored", cause=None, bytes_=1_234_567, seconds=2.0, now=at + 5
        )
        event = ledger.claim_notification("bench", 60, now=time.time() + 1)
        assert event is not None
        ledger.notification_sent(event.batch_id, "bench", now=at + 6)
    ledger.end_known_with_jobs()
    # mark_stored stamps the wall clock: move those stamps to the batch's own moment.
    with ledger.engine.begin() as conn:
        conn.execute(jobs.update().values(updated_at=jobs.c.created_at + 5))
        conn.execute(
            notifications.update().values(
                created_at=sa.select(jobs.c.created_at).where(jobs.c.batch_id == notifications.c.batch_id).scalar_subquery()
            )
        )
        conn.execute(
            notification_deliveries.update().values(
                retry_from=sa.select(jobs.c.created_at)
                .where(jobs.c.batch_id == notification_deliveries.c.batch_id)
                .scalar_subquery()
            )
        )


def sizes(ledger: Ledger) -> dict[str, dict[str, int | None]]:
    return {s.table: {"rows": s.rows, "bytes": s.bytes} for s in ledger.table_sizes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=20_000)
    parser.add_argument("--days", type=float, default=120.0)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    url = (
        args.database_url
        or f"sqlite:///{tempfile.mkdtemp(prefix='bench-retention-', dir='/dev/shm' if os.path.isdir('/dev/shm') else None)}/ledger.db"
    )
    ledger = Ledger(url)
    ledger.create_schema()
    now = time.time()
    started = time.monotonic()
    build(ledger, args.batches, args.days, now)
    built_seconds = time.monotonic() - started
    before = sizes(ledger)
    started = time.monotonic()
    removed: dict[str, int] = {}
    seconds: dict[str, float] = {}
    step_started = started
    for rule, count in ledger.prune_steps(RetentionSettings(), now=now):
        removed[rule.name] = removed.get(rule.name, 0) + count
        seconds[rule.name] = round(seconds.get(rule.name, 0.0) + time.monotonic() - step_started, 2)
        step_started = time.monotonic()
    prune_seconds = time.monotonic() - started
    if ledger.dialect == "postgresql":
        # PostgreSQL's files keep a deleted row's space until autovacuum hands it to new rows; to
        # measure what the kept rows need (the steady state before bloat), compact them.
        with ledger.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM FULL ANALYZE"))
    after = sizes(ledger)
    per_day = args.batches / args.days
    total_before = sum(t["bytes"] or 0 for t in before.values())
    total_after = sum(t["bytes"] or 0 for t in after.values())
    report = {
        "database": ledger.dialect,
        "batches": args.batches,
        "days": args.days,
        "build_seconds": round(built_seconds, 1),
        "prune_seconds": round(prune_seconds, 2),
        "removed": removed,
        "prune_seconds_by_rule": seconds,
        "before": before,
        "after": after,
        "bytes_per_batch_unpruned": round(total_before / args.batches),
        "unpruned_per_million_batches_mb": round(total_before / args.batches * 1e6 / 1e6),
        "steady_state_per_10k_a_day_mb": round(total_after * PER_DAY / per_day / 1e6),
    }
    ledger.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Ledger growth: what the figures, the pages and ingest cost with a year's worth of history behind them.

    flock /tmp/receiver-bench.lock python bench/bench_history.py [--sizes 0,100000,1000000]
        [--backends sqlite,postgres] [--cache /tmp/bench-history] [--json out.json]

For each backend and size it builds a ledger holding that many batches of history, as the product
leaves them at 10,000 batches a day (README, "Ledger growth and retention"): three deliveries (two
`batch.progress`, one `batch.completed`), one stored job (27 % after a failed attempt, so 1.27
attempt rows), one `batch.stored` event with its body and its webhook delivery sent, one ended known batch; and, on
SQLite, a local storage tree with a manifest and a small results file per batch. The history ends a
day before the run, so the last-24-hours windows hold the run's own traffic, as on an empty ledger.

The rows go in through the ledger's schema in multi-row INSERTs of their final shapes, in large
transactions: the figures are kept by the ledger's triggers (migration 0004), which fire for these
rows exactly as for the product's own statements, so counters and indexes end as in production; the
build checks that the figures it reads equal the whole-table aggregates. SQLite ledgers (and their
storage trees) are cached under `--cache`, so a 1M build is paid once; PostgreSQL ones are built in
a throwaway cluster (tests/_postgres.py, fsync on) each run.

Against gunicorn with the production settings (and RECEIVER_ADMIN_TOKEN) it measures the median
time of `GET /metrics`, `GET /admin`, `GET /admin/jobs`; `receiver status --json` and `receiver ls`
as commands; ingest rate and p99 (bench_ingest's client) without and with a scraper hitting
`/metrics` every 5 s; and the disk per table. Sizes are a flag: `--sizes 0,2000` is a smoke run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import ROOT, machine, receiver_env, start_gunicorn, write_json  # noqa: E402
from bench.bench_ingest import SECRET, prepare_ledger, run_load  # noqa: E402
from receiver import layout  # noqa: E402
from receiver.ledger import Ledger, reports  # noqa: E402
from receiver.ledger.outbox import event_body, new_webhook_id  # noqa: E402
from receiver.ledger.schema import (  # noqa: E402
    deliveries,
    job_attempts,
    jobs,
    known_batches,
    notification_deliveries,
    notifications,
)
from receiver.manifest import Manifest, StoredFile  # noqa: E402

PER_DAY = 10_000
CHUNK = 5_000
TOKEN = "bench-admin-token-" + "t" * 20
RESULTS = b"".join(json.dumps({"custom_id": f"r{i}", "response": {"text": "x" * 120}}).encode() + b"\n" for i in range(10))


# --- building history ----------------------------------------------------------------------------------


def build(url: str, size: int, storage: Path | None, end: float) -> float:
    """Write `size` batches of history ending at `end`; answers the seconds it took."""
    ledger = Ledger(url)
    ledger.create_schema()
    start = time.perf_counter()
    rng = random.Random(size)
    first = end - size * 86400 / PER_DAY
    for chunk in range(0, size, CHUNK):
        rows: dict[str, list[dict[str, Any]]] = {
            "deliveries": [],
            "known": [],
            "jobs": [],
            "attempts": [],
            "notes": [],
            "sent": [],
        }
        for i in range(chunk, min(size, chunk + CHUNK)):
            _batch(rows, rng, f"bat_h{i:08d}", first + i * 86400 / PER_DAY, storage)
        with ledger.begin() as conn:
            conn.execute(deliveries.insert(), rows["deliveries"])
            conn.execute(known_batches.insert(), rows["known"])
            conn.execute(jobs.insert(), rows["jobs"])
            conn.execute(job_attempts.insert(), rows["attempts"])
            conn.execute(notifications.insert(), rows["notes"])
            conn.execute(notification_deliveries.insert(), rows["sent"])
        print(f"  built {min(size, chunk + CHUNK):>9,} / {size:,}", end="\r", flush=True)
    seconds = time.perf_counter() - start
    print()
    ledger.close()
    return seconds


def _batch(rows: dict[str, list[dict[str, Any]]], rng: random.Random, batch_id: str, t: float, storage: Path | None) -> None:
    for n, (kind, status, outcome) in enumerate(
        (
            ("batch.progress", "processing", "ignored"),
            ("batch.progress", "processing", "ignored"),
            ("batch.completed", "completed", "accepted"),
        )
    ):
        rows["deliveries"].append(
            {
                "event_id": f"evt_{batch_id}_{n}",
                "batch_id": batch_id,
                "event_type": kind,
                "status": status,
                "outcome": outcome,
                "received_at": t + 60 * n,
            }
        )
    polled = rng.random() < 0.01  # a lost terminal delivery: polling found it
    rows["known"].append(
        {
            "batch_id": batch_id,
            "source": "delivery",
            "state": "ended",
            "first_seen_at": t,
            "next_poll_at": None,
            "polls": 2 if polled else 0,
            "last_polled_at": t + 300 if polled else None,
            "last_status": "completed" if polled else None,
            "found_by_poll": polled,
        }
    )
    retried = rng.random() < 0.27
    planned, stored = t + 121, t + 121 + (65 if retried else 4) + rng.random() * 10
    stored_at = dt.datetime.fromtimestamp(stored, dt.UTC)
    day = layout.partition_date(stored_at)
    results = StoredFile(key=layout.results_key(batch_id, day), bytes=len(RESULTS), sha256="0" * 64, lines=10)
    manifest = Manifest(batch_id, "completed", (results,), stored_at, (f"evt_{batch_id}_2",), "artifact", 10, {"id": batch_id})
    rows["jobs"].append(
        {
            "batch_id": batch_id,
            "state": "stored",
            "attempts": 2 if retried else 1,
            "next_attempt_at": t + 120,
            "origin": "poll" if polled else "webhook",
            "created_at": t + 120,
            "updated_at": stored,
            "planned_at": planned,
            "stored_at": stored,
            "batch_status": "completed",
            "manifest_key": layout.manifest_key(batch_id),
            "bytes": len(RESULTS),
            "lines": 10,
            "expected_items": 10,
            "counts_match": True,
            "bytes_so_far": len(RESULTS),
        }
    )
    if retried:
        rows["attempts"].append(_attempt(batch_id, 1, "failed", "rate_limit", None, None, planned + 2))
    rows["attempts"].append(_attempt(batch_id, 2 if retried else 1, "stored", None, len(RESULTS), 1.5, stored))
    rows["notes"].append(
        {"batch_id": batch_id, "webhook_id": new_webhook_id(), "body": event_body(manifest, stored_at), "created_at": stored}
    )
    rows["sent"].append(
        {
            "batch_id": batch_id,
            "target": "webhook",
            "state": "sent",
            "attempts": 1,
            "next_attempt_at": stored,
            "retry_from": stored,
            "lease_owner": None,
            "lease_expires_at": None,
            "last_error": None,
            "sent_at": stored + 0.2,
        }
    )
    if storage is not None:
        for key, data in ((results.key, RESULTS), (layout.manifest_key(batch_id), manifest.to_bytes())):
            path = storage / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def _attempt(
    batch_id: str, attempt: int, outcome: str, cause: str | None, size: int | None, seconds: float | None, at: float
) -> dict[str, Any]:
    return {
        "batch_id": batch_id,
        "attempt": attempt,
        "outcome": outcome,
        "cause": cause,
        "bytes": size,
        "seconds": seconds,
        "finished_at": at,
    }


def check_figures(url: str, size: int) -> None:
    """The counters the triggers kept equal what the rows say (the build skipped no bookkeeping)."""
    ledger = Ledger(url)
    stats, figures = ledger.stats(), reports.metric_figures(ledger)
    with ledger.connect() as conn:
        stored = conn.exec_driver_sql("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM jobs WHERE state = 'stored'").one()
        retries = conn.exec_driver_sql("SELECT COUNT(*) FROM job_attempts WHERE outcome = 'failed'").scalar_one()
    ledger.close()
    assert stats["jobs"]["stored"] == stored[0] == figures["duration"]["count"] >= size, (stats["jobs"], stored, size)
    assert stats["stored_bytes"] == stored[1] and figures["retries"].get("rate_limit", 0) == retries


def settle(url: str) -> None:
    """VACUUM ANALYZE a PostgreSQL ledger after its bulk build, as autovacuum leaves a ledger that
    grew over months: the build's 15 deltas a batch were folded at once by check_figures, and until
    a vacuum their dead rows make every read of `counter_deltas` a scan of them (0.5 s at 1M)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()


# --- measuring -----------------------------------------------------------------------------------------


def timed_get(url: str, *, token: str | None = None, repeats: int = 7) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    times = []
    for n in range(repeats + 1):
        start = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=300) as resp:
            resp.read()
        if n:  # the first warms the worker
            times.append(time.perf_counter() - start)
    return {"median_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000}


def timed_command(args: list[str], env: dict[str, str], repeats: int = 3) -> dict[str, float]:
    times, lines = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "receiver", *args], env=env, cwd=ROOT, capture_output=True, timeout=1800)
        times.append(time.perf_counter() - start)
        assert done.returncode == 0, done.stderr.decode()[-500:]
        lines = done.stdout.count(b"\n")
    return {"median_ms": statistics.median(times) * 1000, "lines": lines}


def ingest(url: str, pid: int, *, requests: int, scrape_every: float | None) -> dict[str, Any]:
    """bench_ingest's load (64 connections); with `scrape_every`, a scraper GETs /metrics meanwhile."""
    stop = threading.Event()
    scrapes: list[float] = []

    def scrape() -> None:
        while not stop.wait(scrape_every):
            start = time.perf_counter()
            with urllib.request.urlopen(f"{url}/metrics", timeout=300) as resp:
                resp.read()
            scrapes.append((time.perf_counter() - start) * 1000)

    scraper = threading.Thread(target=scrape, daemon=True) if scrape_every else None
    if scraper:
        scraper.start()
    try:
        run = run_load(url, 64, requests, 300, pid)
    finally:
        stop.set()
        if scraper:
            scraper.join()
    return {"per_second": run["per_second"], "p99_ms": run["p99_ms"], "failures": run["failures"], "scrapes_ms": scrapes}


def disk_per_table(url: str) -> dict[str, int]:
    ledger = Ledger(url)
    with ledger.connect() as conn:
        if ledger.dialect == "sqlite":
            rows = conn.exec_driver_sql(
                "SELECT COALESCE(i.tbl_name, d.name), SUM(d.pgsize) FROM dbstat d LEFT JOIN sqlite_master i ON i.name = d.name GROUP BY 1"
            ).all()
        else:
            rows = conn.exec_driver_sql(
                "SELECT relname, pg_total_relation_size(relid) FROM pg_catalog.pg_statio_user_tables"
            ).all()
    ledger.close()
    return {name: int(size) for name, size in sorted(rows, key=lambda r: -r[1]) if size}


def measure(url: str, storage: Path, work: Path, *, requests: int, repeats: int) -> dict[str, Any]:
    """Pages, commands and disk first (history only), then ingest (which adds its own traffic)."""
    ledger = Ledger(url)
    known = SECRET in ledger.accepted_secrets()
    ledger.close()
    if not known:  # a cached ledger has it from an earlier run
        prepare_ledger(url)  # the benchmark's webhook secret
    env = receiver_env(work, DATABASE_URL=url, RECEIVER_STORAGE_URL=str(storage), RECEIVER_ADMIN_TOKEN=TOKEN)
    out: dict[str, Any] = {
        "status": timed_command(["status", "--json"], env),
        "ls": timed_command(["ls"], env, repeats=1),
        "disk": disk_per_table(url),
    }
    proc, web = start_gunicorn("receiver.app:create_app()", env, work, "web")
    try:
        time.sleep(1.2)  # the secret cache
        out["metrics"] = timed_get(f"{web}/metrics")
        out["admin"] = timed_get(f"{web}/admin", token=TOKEN)
        out["admin_jobs"] = timed_get(f"{web}/admin/jobs", token=TOKEN)
        out["admin_search"] = timed_get(f"{web}/admin/jobs?q=bat_h00000001", token=TOKEN, repeats=3)
        without, with_scraper = [], []
        for _ in range(repeats):  # alternated, so drift of the shared machine hits both alike
            without.append(ingest(web, proc.pid, requests=requests, scrape_every=None))
            with_scraper.append(ingest(web, proc.pid, requests=requests, scrape_every=5.0))
        out["ingest"] = _ingest_summary(without)
        out["ingest_scraped"] = _ingest_summary(with_scraper)
    finally:
        proc.stop()
    return out


def _ingest_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "per_second": statistics.median(r["per_second"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "failures": sum(r["failures"] for r in runs),
        "scrapes_ms": [round(s, 1) for r in runs for s in r["scrapes_ms"]],
    }


# --- the run -------------------------------------------------------------------------------------------


def sqlite_ledger(cache: Path, size: int, end: float) -> tuple[str, Path, float | None]:
    """A cached SQLite ledger (and storage tree) of `size` batches, built once."""
    folder = cache / f"sqlite-{size}"
    url, storage = f"sqlite:///{folder}/receiver.db", folder / "storage"
    if (folder / "built").exists():
        return url, storage, None
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    storage.mkdir(parents=True)
    seconds = build(url, size, storage, end)
    check_figures(url, size)
    (folder / "built").write_text(json.dumps({"size": size, "end": end, "seconds": seconds}))
    return url, storage, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,100000,1000000", help="batches of history, comma-separated (0: an empty ledger)")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--cache", default="/tmp/bench-history", help="where built SQLite ledgers are kept between runs")
    parser.add_argument("--requests", type=int, default=6000, help="deliveries per ingest run (default 6000)")
    parser.add_argument("--repeats", type=int, default=2, help="ingest runs per mode; the median is reported")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = args.backends.split(",")
    end = time.time() - 86400  # history ends a day ago: the 24-hour windows hold the run's traffic
    report: dict[str, Any] = {"machine": machine(), "per_day": PER_DAY, "runs": []}
    with ExitStack() as stack:
        cluster = None
        if "postgres" in backends:
            from tests._postgres import fresh_database, postgres_cluster

            cluster = stack.enter_context(postgres_cluster(fsync=True))
            if cluster is None:
                raise SystemExit("PostgreSQL is not installed (.ci/run installs it)")
        for backend in backends:
            for size in sizes:
                work = Path(tempfile.mkdtemp(prefix="bench-history-"))
                print(f"{backend}, {size:,} batches")
                if backend == "sqlite":
                    url, storage, built = sqlite_ledger(Path(args.cache), size, end)
                else:
                    assert cluster is not None
                    url, storage = fresh_database(cluster), work / "storage"
                    built = build(url, size, None, end)
                    check_figures(url, size)
                    settle(url)
                row = {"backend": backend, "size": size, "build_seconds": built}
                row.update(measure(url, storage, work, requests=args.requests, repeats=args.repeats))
                report["runs"].append(row)
                _print(row)
                if backend == "sqlite":
                    _forget_traffic(url, end)
    _print_ratios(report["runs"])
    write_json(args.json, report)
    return 0


def _forget_traffic(url: str, end: float) -> None:
    """Delete what the measurement added (deliveries and jobs newer than the history), so that the
    cached ledger holds history only, for the next run."""
    ledger = Ledger(url)
    with ledger.begin() as conn:
        conn.exec_driver_sql("DELETE FROM deliveries WHERE received_at > ?", (end + 3600,))
        conn.exec_driver_sql("DELETE FROM known_batches WHERE first_seen_at > ?", (end + 3600,))
    ledger.close()


def _print(row: dict[str, Any]) -> None:
    print(
        f"  /metrics {row['metrics']['median_ms']:.1f} ms  /admin {row['admin']['median_ms']:.1f} ms  "
        f"/admin/jobs {row['admin_jobs']['median_ms']:.1f} ms  search {row['admin_search']['median_ms']:.1f} ms  "
        f"status {row['status']['median_ms']:.0f} ms  ls {row['ls']['median_ms']:.0f} ms ({row['ls']['lines']} lines)"
    )
    for mode in ("ingest", "ingest_scraped"):
        r = row[mode]
        print(
            f"  {mode:<15} {r['per_second']:.0f}/s  p99 {r['p99_ms']:.1f} ms  failures {r['failures']}  scrapes {r['scrapes_ms']}"
        )
    print(f"  disk: {', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in row['disk'].items())}")


def _print_ratios(runs: list[dict[str, Any]]) -> None:
    """Each figure as a ratio to the same backend's empty ledger (size 0), when one was measured."""
    for run in runs:
        empty = next((r for r in runs if r["backend"] == run["backend"] and r["size"] == 0), None)
        if empty is None or run is empty:
            continue
        parts = [
            f"{k} x{run[k]['median_ms'] / empty[k]['median_ms']:.2f}" for k in ("metrics", "admin", "admin_jobs", "status", "ls")
        ]
        scraped = run["ingest_scraped"]["p99_ms"] / run["ingest"]["p99_ms"]
        rate = run["ingest"]["per_second"] / empty["ingest"]["per_second"]
        print(
            f"{run['backend']} {run['size']:,}: {'  '.join(parts)}  ingest rate x{rate:.2f}  p99 scraped/unscraped x{scraped:.2f}"
        )


if __name__ == "__main__":
    raise SystemExit(main())

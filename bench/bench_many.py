"""Many at once: 200 batches of 5 MB through one worker with 1, 4 and 16 downloads in flight.

    flock /tmp/receiver-bench.lock python bench/bench_many.py [--batches 200] [--size-mb 5] [--concurrency 1,4,16]

For each concurrency (`RECEIVER_WORKER_CONCURRENCY`) the emulator (its own process) gets `--batches`
completed batches, all of them are queued in a fresh ledger, and one `receiver worker` process works
through them. The time runs from the first claim (the earliest job `planned_at`) to the last manifest
(the latest manifest mtime); every manifest's sha256 is checked against the emulator's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import Proc, http_json, machine, peak_rss_kib, receiver_env, start_emulator, write_json  # noqa: E402


def run(api: str, base: Path, batches: int, size: int, concurrency: int, tag: str) -> dict:
    from receiver.ledger import Ledger

    work = base / f"c{concurrency}"
    work.mkdir()
    env = receiver_env(work, api, RECEIVER_WORKER_CONCURRENCY=str(concurrency))
    expected = {}
    for i in range(batches):
        batch_id = f"bat_many_{tag}_c{concurrency}_{i:04d}"
        made = http_json("POST", f"{api}/_emulator/batches", {"id": batch_id, "size_bytes": size, "status": "completed"})
        expected[batch_id] = made.get("sha256")
    ledger = Ledger(env["DATABASE_URL"])
    ledger.create_schema()
    for batch_id in expected:
        ledger.enqueue(batch_id, origin="fetch")
    manifests = Path(env["RECEIVER_STORAGE_URL"]) / "manifests"
    with Proc(f"worker-c{concurrency}", [sys.executable, "-m", "receiver", "worker"], env, work) as worker:
        deadline = time.monotonic() + 3600
        while True:
            stats = ledger.stats()["jobs"]
            if stats["stored"] == batches:
                break
            if stats["dead"] or worker.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"concurrency {concurrency}: {stats}; see {worker.log_path}")
            time.sleep(0.1)
        peak = peak_rss_kib(worker.pid)
    first_claim = min(job["planned_at"] for job in ledger.list_jobs(limit=batches))
    retried = sum(1 for job in ledger.list_jobs(limit=batches) if job["attempts"] > 1)
    ledger.close()
    last_manifest = 0.0
    wrong = 0
    for batch_id, sha in expected.items():
        path = manifests / f"{batch_id}.json"
        last_manifest = max(last_manifest, path.stat().st_mtime)
        files = json.loads(path.read_text())["files"]
        if sha is not None and files[0]["sha256"] != sha:
            wrong += 1
    elapsed = last_manifest - first_claim
    shutil.rmtree(work, ignore_errors=True)
    return {
        "concurrency": concurrency,
        "batches": batches,
        "seconds": elapsed,
        "batches_per_minute": batches / elapsed * 60,
        "mb_per_s": batches * size / 1e6 / elapsed,
        "sha256_mismatches": wrong,
        "jobs_retried": retried,
        "worker_peak_rss_mib": peak / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--size-mb", type=float, default=5, help="artifact size in MB (10^6 bytes)")
    parser.add_argument("--concurrency", default="1,4,16", help="RECEIVER_WORKER_CONCURRENCY values, comma-separated")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    size = int(args.size_mb * 1_000_000)

    report: dict = {"machine": machine(), "runs": []}
    base = Path(tempfile.mkdtemp(prefix="bench-many-"))
    emulator, api = start_emulator(base)
    tag = str(int(time.time()))
    try:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            row = run(api, base, args.batches, size, concurrency, tag)
            report["runs"].append(row)
            print(
                f"{concurrency:>3} in flight | {row['batches']} x {args.size_mb:g} MB in {row['seconds']:6.1f} s |"
                f" {row['batches_per_minute']:6.0f} batches/min | {row['mb_per_s']:5.0f} MB/s |"
                f" sha256 mismatches {row['sha256_mismatches']} | retried {row['jobs_retried']} |"
                f" worker peak RSS {row['worker_peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    finally:
        emulator.stop()
        shutil.rmtree(base, ignore_errors=True)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Streaming to local storage: the worker against `curl -s -o F URL && sync F`, same URL, same disk.

    flock /tmp/receiver-bench.lock python bench/bench_stream_local.py [--sizes 10,100,1000]

For each artifact size (MB = 10^6 bytes) the emulator (its own process) serves a completed batch.
Both sides fetch the same signed artifact URL onto the same file system:

- reference: `curl -s -o F URL && sync F`, timed together, so it too ends with the bytes on disk;
- receiver: a fresh `receiver worker` process takes the job; its time runs from the claim (the job's
  `planned_at`, set by the claim) to the manifest being visible (the manifest file's mtime), so it
  includes GET /v1/batches/{id}, the artifact-url call, the download with sha256 and line count, the
  fsync and rename, and the manifest.

The sides alternate, `--repeats` times each, and medians are reported. The worker process is new for
each size, so its resident-set high-water mark (VmHWM) is that size's peak memory: the 10 MB and 1 GB
figures show whether memory stays flat as the artifact grows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import (  # noqa: E402
    EMULATOR_KEY,
    Proc,
    http_json,
    machine,
    median,
    peak_rss_kib,
    receiver_env,
    start_emulator,
    write_json,
)


def artifact_url(api: str, batch_id: str) -> str:
    req = urllib.request.Request(f"{api}/v1/batches/{batch_id}/artifact-url", headers={"Authorization": f"Bearer {EMULATOR_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read())
    return next(v for k, v in answer.items() if isinstance(v, str) and v.startswith("http") and "error" not in k)


def run_curl(api: str, batch_id: str, folder: Path) -> float:
    url = artifact_url(api, batch_id)
    target = folder / f"curl-{batch_id}.jsonl"
    start = time.perf_counter()
    subprocess.run(["sh", "-c", 'curl -s -f -o "$1" "$2" && sync "$1"', "sh", str(target), url], check=True)
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


def run_worker(env: dict[str, str], work: Path, batch_id: str, name: str) -> tuple[float, int]:
    """Start a worker, queue the batch, wait for its manifest; (claim-to-manifest seconds, VmHWM KiB)."""
    from receiver.ledger import Ledger

    ledger = Ledger(env["DATABASE_URL"])
    ledger.create_schema()
    manifest = Path(env["RECEIVER_STORAGE_URL"]) / "manifests" / f"{batch_id}.json"
    with Proc(name, [sys.executable, "-m", "receiver", "worker"], env, work) as worker:
        time.sleep(1.0)  # let it import and start polling, so start-up is not timed
        ledger.enqueue(batch_id, origin="fetch")
        deadline = time.monotonic() + 1800
        while not manifest.exists():
            if worker.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not store {batch_id}; see {worker.log_path}")
            row = ledger.job(batch_id)
            if row and row["state"] == "dead":
                raise RuntimeError(f"{batch_id} dead: {row['last_error']}")
            time.sleep(0.02)
        while (ledger.job(batch_id) or {}).get("state") != "stored":
            time.sleep(0.02)
        peak = peak_rss_kib(worker.pid)
    row = ledger.job(batch_id)
    ledger.close()
    elapsed = manifest.stat().st_mtime - row["planned_at"]
    stored = json.loads(manifest.read_text())
    for entry in stored["files"]:
        (Path(env["RECEIVER_STORAGE_URL"]) / entry["key"]).unlink()
    return elapsed, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000", help="artifact sizes in MB (10^6 bytes), comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side and size; medians are reported")
    parser.add_argument("--dir", help="work folder (default: a temporary folder under /tmp); both sides write here")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    report: dict = {"machine": machine(), "runs": []}
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-stream-"))
    base.mkdir(parents=True, exist_ok=True)
    emulator, api = start_emulator(base)
    try:
        for size_mb in (int(s) for s in args.sizes.split(",")):
            size = size_mb * 1_000_000
            curl_s: list[float] = []
            ours_s: list[float] = []
            peaks: list[int] = []
            for attempt in range(args.repeats):
                batch_id = f"bat_stream_{size_mb}mb_{attempt}_{os.getpid()}"
                made = http_json("POST", f"{api}/_emulator/batches", {"id": batch_id, "size_bytes": size, "status": "completed"})
                work = base / batch_id
                work.mkdir()
                env = receiver_env(work, api)
                curl_s.append(run_curl(api, batch_id, work))
                elapsed, peak = run_worker(env, work, batch_id, f"worker-{size_mb}mb-{attempt}")
                ours_s.append(elapsed)
                peaks.append(peak)
                shutil.rmtree(work, ignore_errors=True)
                print(
                    f"  {size_mb:>5} MB run {attempt + 1}: curl {curl_s[-1]:.3f} s, receiver {elapsed:.3f} s,"
                    f" worker VmHWM {peak / 1024:.1f} MiB",
                    flush=True,
                )
            actual = made.get("bytes") or made.get("size") or size
            row = {
                "size_mb": size_mb,
                "bytes": actual,
                "curl_seconds": median(curl_s),
                "receiver_seconds": median(ours_s),
                "curl_mb_per_s": size / 1e6 / median(curl_s),
                "receiver_mb_per_s": size / 1e6 / median(ours_s),
                "ratio": median(curl_s) / median(ours_s),
                "worker_peak_rss_mib": max(peaks) / 1024,
                "all_curl": [round(s, 3) for s in curl_s],
                "all_receiver": [round(s, 3) for s in ours_s],
            }
            report["runs"].append(row)
            print(
                f"{size_mb:>5} MB | curl+sync {row['curl_mb_per_s']:6.0f} MB/s | receiver {row['receiver_mb_per_s']:6.0f} MB/s"
                f" | ratio {row['ratio']:.2f} | worker peak RSS {row['worker_peak_rss_mib']:.1f} MiB",
                flush=True,
            )
    finally:
        emulator.stop()
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    peaks_by_size = {r["size_mb"]: r["worker_peak_rss_mib"] for r in report["runs"]}
    if len(peaks_by_size) > 1:
        small, large = min(peaks_by_size), max(peaks_by_size)
        report["rss_growth_mib"] = peaks_by_size[large] - peaks_by_size[small]
        print(f"worker peak RSS growth {small} MB -> {large} MB: {report['rss_growth_mib']:+.1f} MiB")
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

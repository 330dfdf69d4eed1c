"""Streaming into S3 (moto_server): our worker path against download-then-upload, and peak memory.

    flock /tmp/receiver-bench.lock python bench/bench_s3.py [--sizes-mb 100,1000] [--repeats 3]

One moto_server process and one emulator process serve both sides (docs/benchmarking.md, "Streaming to
S3 (moto_server)"). For each artifact size, alternately, in fresh child processes:

- ours: `Worker.run_job` (what `receiver worker` and `receiver fetch` run) with
  RECEIVER_STORAGE_URL=s3://…: GET the batch, artifact-url, stream the artifact into a multipart
  upload while hashing and counting lines, then the conditional manifest PUT. Timed around run_job.
- reference: `curl -s -o FILE URL` for the same artifact URL, then boto3 `upload_file(FILE)` with its
  defaults (8 MiB parts, 10 threads). Timed together; the client is built before the clock starts.

The median of `--repeats` runs per side is reported. Then peak memory: a `receiver worker` process
per size (`--memory-sizes-mb 10,1000`) stores one batch, and its VmHWM (RSS high-water mark from
/proc) is read before it stops. Objects are deleted from moto after every run (moto keeps them in
memory). `--part-mb`, `--buffer-mb` and `--concurrency` override the writer's settings for
experiments (the defaults are the shipped ones).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
from tests._moto import AWS_TEST_ENV, aws_test_env, moto_server  # noqa: E402

BUCKET = "bench-receiver"
PREFIX = "bench"
MB = 1_000_000
LINE_BYTES = 1000


# --- the two sides, each run in a child process ---------------------------------------------------


def child_ours(batch_id: str) -> dict[str, Any]:
    """Run one job through the worker path in this (fresh) process."""
    from receiver.config import Settings
    from receiver.jobs.worker import Worker
    from receiver.ledger import Ledger
    from receiver.storage import s3

    settings = Settings.from_env()
    ledger = Ledger(settings.database_url)
    ledger.create_schema()
    worker = Worker.from_settings(settings, ledger)
    storage: Any = worker.storage
    if os.environ.get("BENCH_PART_MB"):
        storage.part_size = int(os.environ["BENCH_PART_MB"]) * s3.MiB
    if os.environ.get("BENCH_CONCURRENCY"):
        storage.max_concurrency = int(os.environ["BENCH_CONCURRENCY"])
    ledger.enqueue(batch_id, origin="bench")
    job = ledger.claim(worker.owner, settings.worker.lease_seconds, batch_id=batch_id)
    assert job is not None
    before = peak_rss_kib(os.getpid())
    start = time.perf_counter()
    state = worker.run_job(job)
    seconds = time.perf_counter() - start
    row = ledger.job(batch_id) or {}
    if state != "stored":
        raise SystemExit(f"job ended {state}: {row.get('last_error')}")
    return {"seconds": seconds, "bytes": row["bytes"], "rss_before_kib": before, "rss_peak_kib": peak_rss_kib(os.getpid())}


def child_reference(url: str, path: str, key: str) -> dict[str, Any]:
    """curl to a local file, then boto3's managed upload of that file, with boto3's defaults."""
    import boto3

    client = boto3.client("s3")
    start = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "-o", path, url], check=True)
    downloaded = time.perf_counter()
    client.upload_file(path, BUCKET, key)
    done = time.perf_counter()
    size = os.path.getsize(path)
    os.unlink(path)
    return {"seconds": done - start, "download_seconds": downloaded - start, "upload_seconds": done - downloaded, "bytes": size}


def _child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args], env=env, capture_output=True, text=True, cwd=env["BENCH_WORKDIR"]
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the parent -----------------------------------------------------------------------------------


class Bench:
    def __init__(self, workdir: Path, moto: str, emulator: str, overrides: dict[str, str]) -> None:
        import boto3

        self.workdir = workdir
        self.emulator = emulator
        self.s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
        self.s3.create_bucket(Bucket=BUCKET)
        self.env = receiver_env(
            workdir,
            emulator,
            **AWS_TEST_ENV,
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            AWS_ENDPOINT_URL_S3=moto,
            RECEIVER_STORAGE_URL=f"s3://{BUCKET}/{PREFIX}",
            BENCH_WORKDIR=str(workdir),
            **overrides,
        )
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")]))

    def new_batch(self, size_mb: int) -> str:
        batch = http_json(
            "POST",
            f"{self.emulator}/_emulator/batches",
            {"size_bytes": size_mb * MB, "line_bytes": LINE_BYTES, "status": "completed"},
        )
        return batch["id"]

    def artifact_url(self, batch_id: str) -> str:
        import urllib.request

        req = urllib.request.Request(
            f"{self.emulator}/v1/batches/{batch_id}/artifact-url", headers={"Authorization": f"Bearer {EMULATOR_KEY}"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.loads(resp.read())
        return body["url"]

    def ours(self, size_mb: int) -> dict[str, Any]:
        batch_id = self.new_batch(size_mb)
        result = _child(["--child-ours", batch_id], self.env)
        self.empty_bucket()
        return result

    def reference(self, size_mb: int) -> dict[str, Any]:
        batch_id = self.new_batch(size_mb)
        key = f"{PREFIX}/reference/{batch_id}.jsonl"
        result = _child(
            ["--child-reference", self.artifact_url(batch_id), str(self.workdir / f"{batch_id}.jsonl"), key], self.env
        )
        self.empty_bucket()
        return result

    def worker_peak_rss(self, size_mb: int) -> dict[str, Any]:
        """A `receiver worker` process stores one batch; its RSS high-water mark before and after."""
        from receiver.ledger import Ledger

        with Proc(f"worker-{size_mb}mb", [sys.executable, "-m", "receiver", "worker"], self.env, self.workdir) as worker:
            ledger = Ledger(self.env["DATABASE_URL"])
            ledger.create_schema()
            time.sleep(2.0)  # imported, connected, first housekeeping pass done
            idle = peak_rss_kib(worker.pid)
            batch_id = self.new_batch(size_mb)
            ledger.enqueue(batch_id, origin="bench")
            deadline = time.monotonic() + 600
            while (ledger.job(batch_id) or {}).get("state") != "stored":
                if worker.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not store {batch_id}; see {worker.log_path}")
                time.sleep(0.1)
            peak = peak_rss_kib(worker.pid)
            ledger.close()
        self.empty_bucket()
        return {"size_mb": size_mb, "idle_hwm_mib": round(idle / 1024, 1), "peak_hwm_mib": round(peak / 1024, 1)}

    def empty_bucket(self) -> None:
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for item in page.get("Contents", []):
                self.s3.delete_object(Bucket=BUCKET, Key=item["Key"])
        uploads = self.s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        if uploads:
            raise RuntimeError(f"{len(uploads)} incomplete multipart uploads left in the bucket")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-ours":
        print(json.dumps(child_ours(argv[1])))
        return 0
    if argv and argv[0] == "--child-reference":
        print(json.dumps(child_reference(*argv[1:4])))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", default="100,1000", help="artifact sizes to time, in MB (10^6 bytes)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side and size; the median is reported")
    parser.add_argument("--memory-sizes-mb", default="10,1000", help="artifact sizes for the worker's peak RSS ('' to skip)")
    parser.add_argument("--part-mb", type=int, help="override the writer's part size (MiB)")
    parser.add_argument("--buffer-mb", type=int, help="RECEIVER_S3_BUFFER_MB for our side")
    parser.add_argument("--concurrency", type=int, help="override the writer's parts in flight")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    overrides: dict[str, str] = {}
    if args.part_mb:
        overrides["BENCH_PART_MB"] = str(args.part_mb)
    if args.buffer_mb:
        overrides["RECEIVER_S3_BUFFER_MB"] = str(args.buffer_mb)
    if args.concurrency:
        overrides["BENCH_CONCURRENCY"] = str(args.concurrency)
    report: dict[str, Any] = {"machine": machine(), "overrides": overrides, "timing": [], "memory": []}
    print(f"# {report['machine']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp, aws_test_env(), moto_server() as moto:
        workdir = Path(tmp)
        emulator, emulator_url = start_emulator(workdir)
        try:
            bench = Bench(workdir, moto, emulator_url, overrides)
            for size in [int(s) for s in args.sizes_mb.split(",") if s]:
                ours: list[dict[str, Any]] = []
                ref: list[dict[str, Any]] = []
                for _ in range(args.repeats):
                    ref.append(bench.reference(size))
                    ours.append(bench.ours(size))
                    print(
                        f"{size} MB: reference {ref[-1]['seconds']:.2f} s ({ref[-1]['download_seconds']:.2f} + "
                        f"{ref[-1]['upload_seconds']:.2f}), ours {ours[-1]['seconds']:.2f} s",
                        flush=True,
                    )
                row = {
                    "size_mb": size,
                    "reference_s": round(median([r["seconds"] for r in ref]), 2),
                    "reference_download_s": round(median([r["download_seconds"] for r in ref]), 2),
                    "reference_upload_s": round(median([r["upload_seconds"] for r in ref]), 2),
                    "ours_s": round(median([r["seconds"] for r in ours]), 2),
                    "ours_peak_rss_mib": round(max(r["rss_peak_kib"] for r in ours) / 1024, 1),
                    "runs": {"reference": ref, "ours": ours},
                }
                row["ratio"] = round(row["ours_s"] / row["reference_s"], 2)
                report["timing"].append(row)
                print(
                    f"{size} MB: median reference {row['reference_s']} s, ours {row['ours_s']} s, ratio {row['ratio']}",
                    flush=True,
                )
            for size in [int(s) for s in args.memory_sizes_mb.split(",") if s]:
                memory = bench.worker_peak_rss(size)
                report["memory"].append(memory)
                print(
                    f"worker peak RSS for {size} MB: {memory['peak_hwm_mib']} MiB (idle {memory['idle_hwm_mib']} MiB)", flush=True
                )
        finally:
            emulator.stop()
    if len(report["memory"]) >= 2:
        growth = report["memory"][-1]["peak_hwm_mib"] - report["memory"][0]["peak_hwm_mib"]
        report["memory_growth_mib"] = round(growth, 1)
        print(f"peak RSS growth {report['memory'][0]['size_mb']} MB -> {report['memory'][-1]['size_mb']} MB: {growth:.1f} MiB")
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

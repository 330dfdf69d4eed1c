"""Scaling out: batches per minute with 1, 2 and 4 worker processes; deliveries/s with 1 and 2 web instances.

    flock /tmp/receiver-bench.lock python bench/bench_fleet.py [--batches 100] [--size-mb 5] [--workers 1,2,4]

Two parts, each on PostgreSQL (a throwaway cluster, tests/_postgres.py, fsync on unless
`--pg-fsync off`) and on SQLite, as README "Scaling out" deploys them:

- **Workers.** For each backend (PostgreSQL + moto_server S3, SQLite + local storage) and each worker
  count: a fresh ledger and storage, one web instance (gunicorn with the production settings) and N
  `receiver worker` processes, each in a working folder of its own. `--batches` batches of
  `--size-mb` are created in the emulator as processing, then completed without delivery; their
  signed terminal deliveries go to the web instance in one burst (bench_ingest's client, 16
  connections). Timed from the first delivery to the last job stored (`jobs.stored_at`, written
  after the manifest), so it includes the workers' 0.5 s idle poll. The counts alternate in each of
  `--worker-rounds` rounds and the median is reported.
- **Web instances.** 1 and 2 gunicorn instances (each the Procfile's `web` line) on one ledger,
  bench_ingest's load (distinct signed `batch.progress` deliveries) split evenly over them,
  `--connections` in all; the counts alternate in each round so drift hits both alike. The rate is
  all deliveries over the slower instance's timed window; server CPU per delivery covers every
  instance's processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import (
    Proc,
    cpu_seconds,
    http_json,
    loadavg,
    machine,
    median,
    receiver_env,
    start_emulator,
    start_gunicorn,
    write_json,
)  # noqa: E402
from bench.bench_ingest import _drive, build_requests, prepare_ledger, raw_request  # noqa: E402
from receiver.ledger import Ledger  # noqa: E402

APP = "receiver.app:create_app()"
BUCKET = "bench-fleet"


class Backend:
    """Where a fleet keeps its ledger and its results: a fresh database and storage per run."""

    def __init__(self, name: str, database: Callable[[Path], str], storage: Callable[[Path], str], extra: dict[str, str]) -> None:
        self.name = name
        self._database = database
        self._storage = storage
        self.extra = extra

    def env(self, work: Path, api: str | None = None) -> dict[str, str]:
        work.mkdir(parents=True, exist_ok=True)
        return receiver_env(work, api, DATABASE_URL=self._database(work), RECEIVER_STORAGE_URL=self._storage(work), **self.extra)


def _ledger_sql(database_url: str, sql: str) -> tuple[Any, ...]:
    ledger = Ledger(database_url)
    try:
        with ledger.engine.connect() as conn:
            return tuple(conn.exec_driver_sql(sql).one())
    finally:
        ledger.close()


def find_pid(*fragments: str) -> int | None:
    """The oldest process whose command line holds every fragment (moto_server and PostgreSQL are
    started by tests/ helpers that do not hand out their pids)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(f in cmdline for f in fragments):
                found.append(int(entry.name))
    return min(found) if found else None


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(pid) for pid in group) for name, group in pids.items()}


def _post_burst(url: str, requests: list[bytes], connections: int) -> dict[str, float]:
    return asyncio.run(_drive(url, [], requests, connections))


def run_workers(
    backend: Backend, api: str, base: Path, n_workers: int, args: argparse.Namespace, shared: dict[str, int]
) -> dict[str, Any]:
    """One fleet run; `shared` names the pids of the shared services (emulator, moto, PostgreSQL),
    whose CPU time in the window is reported beside the fleet's own."""
    work = base / f"{backend.name}-workers-{n_workers}"
    env = {**backend.env(work / "web", api), "RECEIVER_WORKER_CONCURRENCY": str(args.concurrency)}
    prepare_ledger(env["DATABASE_URL"])
    tag = uuid.uuid4().hex[:8]
    bodies = []
    for i in range(args.batches):
        batch_id = f"bat_fleet_{tag}_{i:04d}"
        http_json("POST", f"{api}/_emulator/batches", {"id": batch_id, "size_bytes": int(args.size_mb * 1e6)})
        bodies.append(http_json("POST", f"{api}/_emulator/batches/{batch_id}/complete", {"deliver": False})["body"])
    with contextlib.ExitStack() as stack:
        web, url = start_gunicorn(APP, env, work / "web", "web")
        stack.callback(web.stop)
        workers = []
        for i in range(n_workers):
            folder = work / f"worker-{i}"  # a working folder of its own, as on a host of its own
            folder.mkdir()
            workers.append(stack.enter_context(Proc(f"worker-{i}", [sys.executable, "-m", "receiver", "worker"], env, folder)))
        pids = {"web": [web.pid], "workers": [w.pid for w in workers], **{name: [pid] for name, pid in shared.items()}}
        ledger = Ledger(env["DATABASE_URL"])  # one pool for the polling below, not a connection per look
        stack.callback(ledger.close)
        time.sleep(2)  # the workers' start-up (imports, migration check) outside the timed window
        host = url.removeprefix("http://")
        requests = [raw_request(host, body.encode()) for body in bodies]
        load = loadavg()
        cpu_before, bench_before = _cpu(pids), time.process_time()
        first_delivery = time.time()
        sent = _post_burst(url, requests, min(16, len(requests)))
        if sent["failures"]:
            raise RuntimeError(f"{sent['failures']} deliveries failed: {sent['failure_kinds']}; see {web.log_path}")
        deadline = time.monotonic() + 600 + 10 * args.batches
        while True:
            with ledger.engine.connect() as conn:
                stored, dead = conn.exec_driver_sql(
                    "SELECT sum(CASE WHEN state = 'stored' THEN 1 ELSE 0 END), sum(CASE WHEN state = 'dead' THEN 1 ELSE 0 END) FROM jobs"
                ).one()
            if (stored or 0) == args.batches:
                break
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{backend.name}, {n_workers} workers: {stored} stored, {dead} dead; see {work}")
            time.sleep(0.2)
        window = time.time() - first_delivery
        cpu = {name: after - cpu_before[name] for name, after in _cpu(pids).items()}
        cpu["bench client"] = time.process_time() - bench_before
    first_claim, last_stored, total_bytes, retried = _ledger_sql(
        env["DATABASE_URL"],
        "SELECT min(planned_at), max(stored_at), sum(bytes), sum(CASE WHEN attempts > 1 THEN 1 ELSE 0 END) FROM jobs",
    )
    seconds = last_stored - first_delivery
    total_bytes, retried = int(total_bytes), int(retried)  # PostgreSQL's sum() is a Decimal
    shutil.rmtree(work, ignore_errors=True)
    return {
        "backend": backend.name,
        "workers": n_workers,
        "concurrency": args.concurrency,
        "batches": args.batches,
        "seconds": seconds,
        "batches_per_minute": args.batches / seconds * 60,
        "mb_per_s": total_bytes / 1e6 / seconds,
        "ack_seconds": sent["seconds"],
        "first_claim_after_s": first_claim - first_delivery,
        "jobs_retried": retried,
        "loadavg_before": load,
        "cpu_seconds": {name: round(value, 2) for name, value in cpu.items()},
        "cores_busy": sum(cpu.values()) / window,
    }


async def _drive_all(servers: list[tuple[Proc, str]], total: int, warmup: int, connections: int) -> list[dict[str, float]]:
    """bench_ingest's load, split evenly over the servers, all at once."""
    tag = uuid.uuid4().hex[:10]
    share, conns = total // len(servers), max(1, connections // len(servers))
    return await asyncio.gather(
        *(
            _drive(
                url,
                build_requests(url.removeprefix("http://"), warmup, f"{tag}{k}w"),
                build_requests(url.removeprefix("http://"), share, f"{tag}{k}"),
                conns,
                proc.pid,
            )
            for k, (proc, url) in enumerate(servers)
        )
    )


def run_webs(name: str, database_url: str, base: Path, counts: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    work = base / f"{name}-webs"
    env = receiver_env(work, DATABASE_URL=database_url)
    prepare_ledger(database_url)
    servers = []
    try:
        for k in range(max(counts)):
            folder = work / f"web-{k}"
            folder.mkdir()
            servers.append(start_gunicorn(APP, env, folder, f"web-{k}"))
        time.sleep(1.2)  # the secret caches
        samples: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
        for _ in range(args.rounds):
            for n in counts:
                runs = asyncio.run(_drive_all(servers[:n], args.requests, args.warmup, args.connections))
                seconds = max(r["seconds"] for r in runs)
                delivered = sum(r["requests"] for r in runs)
                samples[n].append(
                    {
                        "per_second": delivered / seconds,
                        "failures": sum(r["failures"] for r in runs),
                        "p99_ms": max(r["p99_ms"] for r in runs),
                        "server_cpu_ms": sum(r["server_cpu_ms_per_delivery"] * r["requests"] for r in runs) / delivered,
                    }
                )
    finally:
        for proc, _url in servers:
            proc.stop()
    sent = args.rounds * sum(args.requests // n * n + args.warmup * n for n in counts)
    (recorded,) = _ledger_sql(database_url, "SELECT count(*) FROM deliveries")
    if recorded != sent:
        raise RuntimeError(f"{name}: {recorded} deliveries in the ledger, {sent} answered 200")
    rows = []
    for n in counts:
        rows.append(
            {
                "database": name,
                "instances": n,
                "per_second": median([s["per_second"] for s in samples[n]]),
                "all_per_second": [round(s["per_second"]) for s in samples[n]],
                "p99_ms": median([s["p99_ms"] for s in samples[n]]),
                "server_cpu_ms_per_delivery": median([s["server_cpu_ms"] for s in samples[n]]),
                "failures": sum(s["failures"] for s in samples[n]),
                "vs_one_instance_by_round": [
                    round(s["per_second"] / one["per_second"], 3) for s, one in zip(samples[n], samples[counts[0]])
                ],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=100, help="batches per worker run (default 100)")
    parser.add_argument("--size-mb", type=float, default=5, help="artifact size in MB (10^6 bytes)")
    parser.add_argument("--workers", default="1,2,4", help="worker process counts, comma-separated")
    parser.add_argument("--worker-rounds", type=int, default=3, help="runs per backend and worker count; the median is reported")
    parser.add_argument("--concurrency", type=int, default=4, help="RECEIVER_WORKER_CONCURRENCY of each worker (shipped: 4)")
    parser.add_argument("--webs", default="1,2", help="web instance counts, comma-separated ('' skips the part)")
    parser.add_argument("--backends", default="postgres,sqlite", help="which of postgres, sqlite to measure")
    parser.add_argument("--connections", type=int, default=64, help="web part: connections in all")
    parser.add_argument("--requests", type=int, default=3000, help="web part: measured deliveries per run")
    parser.add_argument("--warmup", type=int, default=300, help="web part: warm-up deliveries per instance")
    parser.add_argument("--rounds", type=int, default=3, help="web part: rounds; the median is reported")
    parser.add_argument("--pg-fsync", choices=("on", "off"), default="on", help="PostgreSQL's fsync (production: on)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    worker_counts = [int(n) for n in args.workers.split(",") if n]
    web_counts = [int(n) for n in args.webs.split(",") if n]
    wanted = args.backends.split(",")

    from tests._moto import AWS_TEST_ENV, aws_test_env, moto_server, reset_moto
    from tests._postgres import fresh_database, postgres_cluster

    report: dict[str, Any] = {"machine": machine(), "pg_fsync": args.pg_fsync, "workers": [], "webs": []}
    base = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        cluster = stack.enter_context(postgres_cluster(fsync=args.pg_fsync == "on")) if "postgres" in wanted else None
        if "postgres" in wanted and cluster is None:
            raise SystemExit("PostgreSQL is not installed (.ci/run installs it)")
        stack.enter_context(aws_test_env())
        moto = stack.enter_context(moto_server())
        import boto3

        s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
        emulator, api = start_emulator(base)
        stack.callback(emulator.stop)
        shared = {"emulator": emulator.pid, "moto": find_pid("moto_server", f"-p {moto.rsplit(':', 1)[1]}")}
        if cluster is not None:  # the postmaster; cpu_seconds() adds its backends
            shared["postgres"] = find_pid("postgres", f"-p {cluster.rsplit(':', 1)[1].split('/')[0]}")
        backends = []
        if "postgres" in wanted:
            assert cluster is not None
            backends.append(
                Backend(
                    "postgres+s3",
                    lambda _work: fresh_database(cluster),
                    lambda work: f"s3://{BUCKET}/{work.name}",
                    {**AWS_TEST_ENV, "AWS_ENDPOINT_URL_S3": moto},
                )
            )
        if "sqlite" in wanted:
            backends.append(
                Backend(
                    "sqlite+local",
                    lambda work: f"sqlite:///{work.parent}/receiver.db",
                    lambda work: str(work.parent / "storage"),
                    {},
                )
            )

        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for round_ in range(args.worker_rounds):
            for backend in backends:
                for n in worker_counts:
                    reset_moto(moto)  # moto keeps every object in memory
                    s3.create_bucket(Bucket=BUCKET)
                    row = run_workers(backend, api, base, n, args, {k: v for k, v in shared.items() if v})
                    runs.setdefault((backend.name, n), []).append(row)
                    print(
                        f"round {round_ + 1} | {row['backend']:>12} | {n} worker(s) | {args.batches} x {args.size_mb:g} MB in"
                        f" {row['seconds']:6.1f} s | {row['batches_per_minute']:6.0f} batches/min | {row['mb_per_s']:5.1f} MB/s |"
                        f" burst acked in {row['ack_seconds']:.2f} s | first claim +{row['first_claim_after_s']:.2f} s |"
                        f" retried {row['jobs_retried']} | load {row['loadavg_before']} | cores busy {row['cores_busy']:.2f}:"
                        f" {', '.join(f'{k} {v:.1f}' for k, v in row['cpu_seconds'].items())} s CPU",
                        flush=True,
                    )
        for (name, n), rows in runs.items():
            rate = median([r["batches_per_minute"] for r in rows])
            report["workers"].append(
                {
                    "backend": name,
                    "workers": n,
                    "batches_per_minute": rate,
                    "all": [round(r["batches_per_minute"]) for r in rows],
                    "runs": rows,
                }
            )
            print(f"median | {name:>12} | {n} worker(s) | {rate:6.0f} batches/min {report['workers'][-1]['all']}", flush=True)
        if web_counts:
            databases = []
            if "postgres" in wanted:
                assert cluster is not None
                databases.append(("postgres", fresh_database(cluster)))
            if "sqlite" in wanted:
                (base / "sqlite-webs").mkdir()
                databases.append(("sqlite", f"sqlite:///{base}/sqlite-webs/receiver.db"))
            for name, database_url in databases:
                for row in run_webs(name, database_url, base, web_counts, args):
                    report["webs"].append(row)
                    print(
                        f"{name:>8} | {row['instances']} web instance(s) | {row['per_second']:6.0f} deliveries/s"
                        f" {row['all_per_second']} | p99 {row['p99_ms']:.1f} ms | server cpu"
                        f" {row['server_cpu_ms_per_delivery']:.2f} ms | vs 1 by round {row['vs_one_instance_by_round']} |"
                        f" failures {row['failures']} | load {loadavg()}",
                        flush=True,
                    )
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

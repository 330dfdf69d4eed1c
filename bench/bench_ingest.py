"""Ingest: signed deliveries per second and time to the 200, against a minimal HMAC-only reference.

    flock /tmp/receiver-bench.lock python bench/bench_ingest.py [--connections 16,64,256]

For each connection count, the same load goes to two gunicorn servers started with the production
settings (`receiver.gunicorn_conf`): the reference (bench/reference_app.py: verify the HMAC, answer
200, record nothing) and the receiver (verify, validate, commit to the SQLite ledger, answer 200).
They are measured alternately, `--repeats` times each, and the median run is reported, so a burst of
other work on the shared machine hits both sides alike; each round's own ratio (the two sides a few
seconds apart) and their median are reported too.

The load follows docs/benchmarking.md, "Ingest": distinct signed `batch.progress` deliveries in the envelope form
(unique event ids, so every one is a new ledger row; no downloads), over keep-alive connections from
an asyncio client on the same machine, timed once a warm-up has gone through the same connections.
`--gunicorn-args` overrides the production settings for both servers (e.g. `"-k sync -w 4"`), which
is how the worker class was chosen.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import Proc, cpu_seconds, machine, median, percentile, receiver_env, start_gunicorn, write_json  # noqa: E402
from receiver.signature import HEADER, sign  # noqa: E402

SECRET = "bench-secret-" + "s" * 24


def build_requests(host: str, count: int, tag: str) -> list[bytes]:
    """`count` distinct signed `batch.progress` deliveries as raw HTTP/1.1 keep-alive requests."""
    out = []
    for i in range(count):
        body = json.dumps(
            {
                "id": f"evt_{tag}_{i:06d}",
                "type": "batch.progress",
                "created": int(time.time()),
                "data": {
                    "batch_id": f"bat_{tag}_{i % 500:04d}",
                    "status": "processing",
                    "items_total": 1000,
                    "items_completed": i % 1000,
                    "items_failed": 0,
                    "cost_usd": "2.4137",
                    "output_file_url": None,
                },
            },
            separators=(",", ":"),
        ).encode()
        out.append(raw_request(host, body))
    return out


def raw_request(host: str, body: bytes) -> bytes:
    """One delivery signed with the benchmark's secret, as a raw HTTP/1.1 keep-alive request."""
    head = (
        f"POST /hooks/batchrouter HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{HEADER}: {sign(SECRET, body)}\r\nUser-Agent: bench\r\n\r\n"
    ).encode()
    return head + body


class _Connection:
    """One keep-alive connection of the client; reopened if the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _send(conn: _Connection, todo: list[bytes], latencies: list[float], failures: list[str]) -> None:
    while todo:
        request = todo.pop()
        if conn.writer is None:
            await conn.open()
        assert conn.reader is not None and conn.writer is not None
        start = time.perf_counter()
        try:
            conn.writer.write(request)
            head = await conn.reader.readuntil(b"\r\n\r\n")
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            await conn.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError) as exc:
            failures.append(type(exc).__name__)
            conn.close()
            continue
        latencies.append(time.perf_counter() - start)
        status = int(head[9:12])
        if status != 200:
            failures.append(str(status))
        if close:  # a sync worker closes after every response: reconnect, as a client must
            conn.close()


async def _drive(
    url: str, warmup: list[bytes], requests: list[bytes], connections: int, server_pid: int | None = None
) -> dict[str, float]:
    """The warm-up, then the measured requests, over the same connections (docs/benchmarking.md,
    "Ingest": the connections are open and warm when the clock starts).

    With `server_pid` (the gunicorn master) the CPU time its processes and this client spent in the
    timed window is reported per delivery: wall-clock rates move 20-30% between runs on this shared
    machine, and CPU per delivery, which sets the rate when both cores are busy, moves less."""
    host, port = url.removeprefix("http://").split(":")
    conns = [_Connection(host, int(port)) for _ in range(connections)]
    for conn in conns:
        await conn.open()
    todo = list(reversed(warmup))
    await asyncio.gather(*(_send(conn, todo, [], []) for conn in conns))
    todo = list(reversed(requests))
    latencies: list[float] = []
    failures: list[str] = []
    # As timeit does: no collection in the client while it times (a full one took 38 ms here, and
    # every request in flight on all 64 connections counted it as the server's latency).
    gc.collect()
    gc.disable()
    try:
        server_cpu = cpu_seconds(server_pid) if server_pid else 0.0
        client_cpu = time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(_send(conn, todo, latencies, failures) for conn in conns))
        elapsed = time.perf_counter() - start
        client_cpu = time.process_time() - client_cpu
        server_cpu = cpu_seconds(server_pid) - server_cpu if server_pid else float("nan")
    finally:
        gc.enable()
    for conn in conns:
        conn.close()
    latencies.sort()
    return {
        "requests": len(requests),
        "seconds": elapsed,
        "per_second": len(requests) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": latencies[-1] * 1000 if latencies else float("nan"),
        "failures": len(failures),
        "failure_kinds": sorted(set(failures)),
        "server_cpu_ms_per_delivery": server_cpu / len(requests) * 1000,
        "client_cpu_ms_per_delivery": client_cpu / len(requests) * 1000,
    }


def prepare_ledger(database_url: str) -> None:
    """The receiver's ledger with the benchmark's webhook secret, as `receiver register` stores it."""
    from receiver.ledger import Ledger

    ledger = Ledger(database_url)
    ledger.create_schema()
    ledger.add_secret(SECRET, grace_seconds=3600)
    ledger.close()


def run_load(url: str, connections: int, count: int, warmup: int, server_pid: int | None = None) -> dict[str, float]:
    tag = uuid.uuid4().hex[:10]
    host = url.removeprefix("http://")
    return asyncio.run(
        _drive(url, build_requests(host, warmup, tag + "w"), build_requests(host, count, tag), connections, server_pid)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", default="16,64,256", help="comma-separated connection counts")
    parser.add_argument("--requests", type=int, default=3000, help="measured deliveries per run (default 3000)")
    parser.add_argument("--warmup", type=int, default=300, help="deliveries sent before each measured run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per side and connection count; the median is reported")
    parser.add_argument("--gunicorn-args", default="", help="extra gunicorn arguments for both servers, e.g. '-k sync -w 4'")
    parser.add_argument("--only", choices=("both", "receiver", "reference"), default="both")
    parser.add_argument(
        "--database-url", help="the receiver's ledger (default: SQLite in a temporary folder), e.g. an empty PostgreSQL database"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    connection_counts = [int(c) for c in args.connections.split(",")]
    extra = shlex.split(args.gunicorn_args)

    report: dict = {"machine": machine(), "gunicorn_args": args.gunicorn_args or "(production settings)", "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        env = receiver_env(work)
        if args.database_url:
            env["DATABASE_URL"] = args.database_url
        report["database"] = env["DATABASE_URL"].split(":", 1)[0]
        prepare_ledger(env["DATABASE_URL"])
        servers: dict[str, tuple[Proc, str]] = {}
        try:
            if args.only in ("both", "reference"):
                servers["reference"] = start_gunicorn(
                    "bench.reference_app:create_app()", {**env, "RECEIVER_WEBHOOK_SECRET": SECRET}, work, "reference", extra
                )
            if args.only in ("both", "receiver"):
                servers["receiver"] = start_gunicorn("receiver.app:create_app()", env, work, "receiver", extra)
            time.sleep(1.2)  # the receiver's secret cache
            for connections in connection_counts:
                samples: dict[str, list[dict]] = {name: [] for name in servers}
                for _ in range(args.repeats):
                    for name, (proc, url) in servers.items():
                        samples[name].append(run_load(url, connections, args.requests, args.warmup, proc.pid))
                row = {"connections": connections}
                for name, runs in samples.items():
                    rate = median([r["per_second"] for r in runs])
                    best = min(runs, key=lambda r: abs(r["per_second"] - rate))
                    row[name] = {**best, "all_per_second": [round(r["per_second"]) for r in runs]}
                if "reference" in row and "receiver" in row:
                    row["ratio"] = row["receiver"]["per_second"] / row["reference"]["per_second"]
                    # Each round runs the two sides a few seconds apart, so its ratio cancels the
                    # slower drift of this shared machine that a ratio of medians keeps.
                    paired = [
                        rec["per_second"] / ref["per_second"] for ref, rec in zip(samples["reference"], samples["receiver"])
                    ]
                    row["round_ratios"] = [round(r, 3) for r in paired]
                    row["ratio_of_rounds"] = median(paired)
                    # The rate ratio the two sides' CPU per delivery predicts when the cores are
                    # the limit (each side's figure plus the client's, which shares the cores).
                    cost = {
                        name: median([r["server_cpu_ms_per_delivery"] + r["client_cpu_ms_per_delivery"] for r in samples[name]])
                        for name in ("reference", "receiver")
                    }
                    row["cpu_ratio"] = cost["reference"] / cost["receiver"]
                report["runs"].append(row)
                _print_row(row)
        finally:
            for proc, _url in servers.values():
                proc.stop()
        if "receiver" in servers:
            from receiver.ledger import Ledger

            ledger = Ledger(env["DATABASE_URL"])
            with ledger.engine.connect() as conn:
                report["receiver_rows"] = conn.exec_driver_sql("SELECT count(*) FROM deliveries").scalar()
            ledger.close()
    expected = len(connection_counts) * args.repeats * (args.requests + args.warmup)
    if "receiver_rows" in report:
        print(f"receiver ledger rows: {report['receiver_rows']} (expected {expected})")
    write_json(args.json, report)
    return 0


def _print_row(row: dict) -> None:
    parts = [f"{row['connections']:>4} conns"]
    for name in ("reference", "receiver"):
        if name in row:
            r = row[name]
            parts.append(
                f"{name}: {r['per_second']:7.0f}/s p50 {r['p50_ms']:6.1f} ms p99 {r['p99_ms']:6.1f} ms"
                f" cpu {r['server_cpu_ms_per_delivery']:.2f}+{r['client_cpu_ms_per_delivery']:.2f} ms"
                f" fail {r['failures']} {r['all_per_second']}"
            )
    if "ratio" in row:
        parts.append(
            f"ratio {row['ratio']:.2f} (rounds {', '.join(f'{r:.2f}' for r in row['round_ratios'])}: median "
            f"{row['ratio_of_rounds']:.2f}; by CPU {row['cpu_ratio']:.2f})"
        )
    print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(main())

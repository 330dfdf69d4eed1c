"""Ingest, one commit against another: paired rounds, each round's ratio, their median.

    flock /tmp/receiver-bench.lock python bench/ab_ingest.py HEAD~1 HEAD [--connections 64] [--rounds 9]

On this shared machine the receiver's rate moves by 20-30% between runs a minute apart, so a change
worth 5-10% cannot be seen by comparing two `bench_ingest.py` runs. Here both commits are served at
once (each from its own `git worktree`, with its own gunicorn settings and ledger), and every round
loads A then B over warm connections seconds apart; a round's B/A ratio cancels most of the drift.
Each side's CPU per delivery (`/proc`, server processes only) is reported too, and their B/A ratio.
The same load as `bench_ingest.py`. How today's ingest steps were decided (BENCHMARKS.md, "Ingest").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import ROOT, Proc, median, receiver_env, start_gunicorn, write_json  # noqa: E402
from bench.bench_ingest import prepare_ledger, run_load  # noqa: E402


def _worktree(ref: str, into: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(into), ref], check=True, capture_output=True
    )
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="the commit to compare against (e.g. HEAD~1)")
    parser.add_argument("b", help="the commit under test (e.g. HEAD)")
    parser.add_argument("--connections", default="64", help="comma-separated connection counts")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    report: dict = {"a": args.a, "b": args.b, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        work = Path(tmp)
        servers: dict[str, tuple[Proc, str]] = {}
        trees = []
        try:
            for side, ref in (("a", args.a), ("b", args.b)):
                tree = _worktree(ref, work / f"tree-{side}")
                trees.append(tree)
                side_dir = work / side
                side_dir.mkdir()
                env = receiver_env(side_dir)
                prepare_ledger(env["DATABASE_URL"])
                servers[side] = start_gunicorn("receiver.app:create_app()", env, side_dir, side, root=tree)
            time.sleep(1.2)  # the receivers' secret caches
            for connections in (int(c) for c in args.connections.split(",")):
                rates: dict[str, list[float]] = {"a": [], "b": []}
                cpu: dict[str, list[float]] = {"a": [], "b": []}  # the server's CPU ms per delivery
                failures = {"a": 0, "b": 0}  # answers other than 200: a side that refuses is not measured
                for _ in range(args.rounds):
                    for side, (proc, url) in servers.items():
                        run = run_load(url, connections, args.requests, args.warmup, proc.pid)
                        rates[side].append(run["per_second"])
                        cpu[side].append(run["server_cpu_ms_per_delivery"])
                        failures[side] += int(run["failures"])
                ratios = [b / a for a, b in zip(rates["a"], rates["b"])]
                cpu_ratios = [b / a for a, b in zip(cpu["a"], cpu["b"])]
                row = {
                    "connections": connections,
                    "a_per_second": [round(r) for r in rates["a"]],
                    "b_per_second": [round(r) for r in rates["b"]],
                    "round_ratios": [round(r, 3) for r in ratios],
                    "median_ratio": median(ratios),
                    "b_faster_rounds": sum(r > 1 for r in ratios),
                    "a_cpu_ms": [round(c, 3) for c in cpu["a"]],
                    "b_cpu_ms": [round(c, 3) for c in cpu["b"]],
                    "median_cpu_ratio": median(cpu_ratios),
                    "failures": failures,
                }
                report["runs"].append(row)
                print(
                    f"{connections:>4} conns | A {median(rates['a']):6.0f}/s {median(cpu['a']):.3f} ms | "
                    f"B {median(rates['b']):6.0f}/s {median(cpu['b']):.3f} ms | "
                    f"B/A by round {', '.join(f'{r:.2f}' for r in ratios)} | median {row['median_ratio']:.3f}, "
                    f"B faster in {row['b_faster_rounds']} of {len(ratios)} | B/A CPU per delivery "
                    f"{row['median_cpu_ratio']:.3f} | not 200: A {failures['a']}, B {failures['b']}",
                    flush=True,
                )
        finally:
            for proc, _url in servers.values():
                proc.stop()
            for tree in trees:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

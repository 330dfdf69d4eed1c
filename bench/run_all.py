"""Run the local benchmarks one after another and keep their figures.

    flock /tmp/receiver-bench.lock python bench/run_all.py [--out bench/out]

Runs bench_ingest.py, bench_stream_local.py and bench_many.py with their defaults (the sizes in
BENCHMARKS.md), printing each one's table and writing `<out>/<name>.json`. Take the lock around this
whole script, not inside it: the benchmarks must not share the machine with each other.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("bench_ingest", "bench_stream_local", "bench_many")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "out"), help="folder for the JSON figures (default bench/out, git-ignored)")
    parser.add_argument("--only", choices=SCRIPTS, action="append", help="run only these (repeatable)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only or SCRIPTS:
        print(f"== {name}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), "--json", str(out / f"{name}.json")])
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

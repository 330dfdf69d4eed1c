"""EXPLAIN ANALYZE of every statement a scrape, the /admin overview and the /admin/jobs page run,
on a PostgreSQL ledger of N batches of history built as bench_history builds it:

    flock /tmp/receiver-bench.lock python bench/explain_history.py [1000000]

What to run when a figure of bench_history.py's PostgreSQL runs grows with history: it names the
statement that does (each one's execution time; the whole plan of any over 2 ms), against the time
the same read takes in process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import event  # noqa: E402

from bench.bench_history import build, check_figures, settle  # noqa: E402
from receiver.ledger import Ledger, reports  # noqa: E402
from receiver.web.admin import JOBS_PER_PAGE  # noqa: E402


def explain(ledger: Ledger, statement: str, params: Any) -> list[str]:
    raw = ledger.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
        return [row[0] for row in cursor.fetchall()]
    finally:
        raw.rollback()  # the fold's DELETE ran under EXPLAIN ANALYZE
        raw.close()


def main(argv: list[str]) -> int:
    from tests._postgres import fresh_database, postgres_cluster

    size = int(argv[0]) if argv else 1_000_000
    with postgres_cluster(fsync=True) as cluster:
        if cluster is None:
            raise SystemExit("PostgreSQL is not installed (.ci/run installs it)")
        url = fresh_database(cluster)
        print(f"built {size:,} batches in {build(url, size, None, time.time() - 86400):.0f} s")
        check_figures(url, size)
        settle(url)
        ledger = Ledger(url)
        seen: list[tuple[str, Any]] = []

        def capture(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
            seen.append((statement, params))

        reads = {
            "scrape": lambda: reports.scrape(ledger),
            "overview (/admin)": lambda: reports.overview(ledger),
            "jobs page (/admin/jobs)": lambda: reports.find_jobs(ledger, limit=JOBS_PER_PAGE + 1),
        }
        for name, call in reads.items():
            call()  # warm
            seen.clear()
            event.listen(ledger.engine, "before_cursor_execute", capture)
            start = time.perf_counter()
            call()
            took = (time.perf_counter() - start) * 1000
            event.remove(ledger.engine, "before_cursor_execute", capture)
            print(f"\n{name}: {took:.1f} ms in process, {len(seen)} statements")
            for statement, params in seen:
                plan = explain(ledger, statement, params)
                total = next(line for line in plan if "Execution Time" in line)
                print(f"  {total.split(':')[1].strip():>10}  {' '.join(statement.split())[:110]}")
                if float(total.split(":")[1].split()[0]) > 2.0:
                    print("\n".join("      " + line for line in plan))
        ledger.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

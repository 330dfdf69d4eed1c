"""Counters kept as rows change, and the indexes the status page's lists page through.

`/metrics`, `/admin` and `receiver status` used to aggregate every job, attempt, known batch and
notification ever written on each request: at a million batches a scrape took a second or more. From
here the figures of history are rows of `counters`, changed by triggers in the transaction that
changes the row they count, whichever code path writes it (SQLAlchemy, the SQLite group commit's
own statements, a bulk load). On PostgreSQL the triggers append to `counter_deltas` instead, so
concurrent writers never queue on one row; reading folds the deltas in (ledger/counters.py).

Pruning deletes history rows without lowering a figure: deleting a stored job leaves `jobs:stored`
as it was; deleting a job in any other state (work in flight, or dead and waiting for an operator)
takes it out of its state's count. The upgrade fills the counters from the rows already
there, so an upgraded ledger keeps its figures.

The histogram buckets are written into the triggers: changing them needs a new revision.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: The job histograms' upper bounds, as ledger/reports.py reads them (seconds; bytes).
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
BYTES_BUCKETS = tuple(float(1024**2 * n) for n in (1, 10, 100, 1024, 10 * 1024, 100 * 1024))
#: States a deleted job leaves: all but `stored`, which counts the batches stored, pruned or not. A
#: dead job waits for an operator (an alert fires while any does), so deleting one lowers the count.
LEFT_ON_DELETE = ("queued", "running", "failed", "dead")

#: One count: (name expression, value expression, condition), over the trigger's NEW/OLD rows.
Count = tuple[str, str, str]


def _label(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else str(bound)


def _bucket(prefix: str, value: str, bounds: tuple[float, ...]) -> str:
    """The name of the (non-cumulative) bucket `value` falls in: `prefix:le:<bound>` or `:le:+Inf`."""
    whens = " ".join(f"WHEN {value} <= {bound!r} THEN '{prefix}:le:{_label(bound)}'" for bound in bounds)
    return f"CASE {whens} ELSE '{prefix}:le:+Inf' END"


def _histogram(prefix: str, value: str, bounds: tuple[float, ...], cond: str) -> list[Count]:
    return [(_bucket(prefix, value, bounds), "1", cond), (f"'{prefix}:count'", "1", cond), (f"'{prefix}:sum'", value, cond)]


def _stored(row: str) -> list[Count]:
    """What a job entering `stored` adds: bytes, mismatched counts and both histograms."""
    duration = f"({row}.updated_at - {row}.planned_at)"
    return [
        ("'stored_bytes'", f"{row}.bytes", f"{row}.bytes IS NOT NULL"),
        ("'counts_mismatch'", "1", f"{row}.counts_match = false"),
        *_histogram("duration", duration, DURATION_BUCKETS, f"{row}.planned_at IS NOT NULL"),
        *_histogram("bytes", f"{row}.bytes", BYTES_BUCKETS, f"{row}.bytes IS NOT NULL"),
    ]


#: table -> event -> counts.
COUNTS: dict[str, dict[str, list[Count]]] = {
    "jobs": {
        "INSERT": [
            ("'jobs:' || NEW.state", "1", "true"),
            *[(n, v, f"NEW.state = 'stored' AND {c}") for n, v, c in _stored("NEW")],
        ],
        "UPDATE": [
            ("'jobs:' || OLD.state", "-1", "OLD.state <> NEW.state"),
            ("'jobs:' || NEW.state", "1", "OLD.state <> NEW.state"),
            *[(n, v, f"NEW.state = 'stored' AND OLD.state <> 'stored' AND {c}") for n, v, c in _stored("NEW")],
        ],
        "DELETE": [("'jobs:' || OLD.state", "-1", f"OLD.state IN ({', '.join(repr(s) for s in LEFT_ON_DELETE)})")],
    },
    "job_attempts": {
        "INSERT": [
            ("'retries:' || COALESCE(NEW.cause, 'other')", "1", "NEW.outcome IN ('failed', 'dead')"),
            ("'downloaded_bytes'", "NEW.bytes", "NEW.outcome = 'stored' AND NEW.bytes IS NOT NULL AND NEW.seconds IS NOT NULL"),
            ("'download_seconds'", "NEW.seconds", "NEW.outcome = 'stored' AND NEW.bytes IS NOT NULL AND NEW.seconds IS NOT NULL"),
        ],
    },
    "known_batches": {
        "INSERT": [("'polls'", "NEW.polls", "NEW.polls <> 0"), ("'found_by_poll'", "1", "NEW.found_by_poll = true")],
        "UPDATE": [
            ("'polls'", "NEW.polls - OLD.polls", "NEW.polls <> OLD.polls"),
            ("'found_by_poll'", "1", "NEW.found_by_poll = true AND OLD.found_by_poll = false"),
        ],
    },
    "notifications": {
        "INSERT": [("'notifications:sent'", "1", "NEW.state = 'sent'")],
        "UPDATE": [("'notifications:sent'", "1", "NEW.state = 'sent' AND OLD.state <> 'sent'")],
    },
}

#: When an UPDATE can count at all: a lease renewal or a poll claim touches no figure, and skips them.
GUARDS = {
    "jobs": "OLD.state <> NEW.state",
    "known_batches": "NEW.polls <> OLD.polls OR NEW.found_by_poll <> OLD.found_by_poll",
    "notifications": "OLD.state <> NEW.state",
}

SQLITE_COUNT = (
    "INSERT INTO counters (name, value) SELECT {name}, {value} WHERE {cond} "
    "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value;"
)
POSTGRES_COUNT = "INSERT INTO counter_deltas (name, value) SELECT {name}, {value} WHERE {cond};"


def _statements(template: str, counts: list[Count]) -> str:
    return "\n".join(template.format(name=n, value=v, cond=c) for n, v, c in counts)


def _create_sqlite_triggers() -> None:
    for table, events in COUNTS.items():
        for event, counts in events.items():
            when = f" WHEN {GUARDS[table]}" if event == "UPDATE" and table in GUARDS else ""
            op.execute(
                f"CREATE TRIGGER counters_{table}_{event.lower()} AFTER {event} ON {table} FOR EACH ROW{when} BEGIN\n"
                f"{_statements(SQLITE_COUNT, counts)}\nEND"
            )


def _guard(table: str, event: str) -> str:
    return f" AND ({GUARDS[table]})" if event == "UPDATE" and table in GUARDS else ""


def _create_postgres_triggers() -> None:
    for table, events in COUNTS.items():
        branches = " ELS".join(
            f"IF TG_OP = '{event}'{_guard(table, event)} THEN\n{_statements(POSTGRES_COUNT, counts)}\n"
            for event, counts in events.items()
        )
        op.execute(
            f"CREATE FUNCTION counters_{table}() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n{branches}END IF;\n"
            "RETURN NULL;\nEND\n$$"
        )
        op.execute(
            f"CREATE TRIGGER counters_{table} AFTER {' OR '.join(events)} ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION counters_{table}()"
        )


def _backfill_histogram(prefix: str, value: str, bounds: tuple[float, ...], where: str) -> None:
    op.execute(
        f"INSERT INTO counters (name, value) SELECT bucket, COUNT(*) FROM "
        f"(SELECT {_bucket(prefix, value, bounds)} AS bucket FROM jobs WHERE {where}) AS rows GROUP BY bucket"
    )
    op.execute(
        f"INSERT INTO counters (name, value) SELECT '{prefix}:count', COUNT(*) FROM jobs WHERE {where} "
        f"UNION ALL SELECT '{prefix}:sum', COALESCE(SUM({value}), 0) FROM jobs WHERE {where}"
    )


def _backfill() -> None:
    """The figures the old whole-table aggregates gave, read once from the rows already there."""
    stored = "state = 'stored'"
    for sql in (
        "INSERT INTO counters (name, value) SELECT 'jobs:' || state, COUNT(*) FROM jobs GROUP BY state",
        "INSERT INTO counters (name, value) SELECT 'stored_bytes', COALESCE(SUM(bytes), 0) FROM jobs",
        "INSERT INTO counters (name, value) SELECT 'counts_mismatch', COUNT(*) FROM jobs WHERE counts_match = false",
        "INSERT INTO counters (name, value) SELECT 'retries:' || COALESCE(cause, 'other'), COUNT(*) FROM job_attempts "
        "WHERE outcome IN ('failed', 'dead') GROUP BY COALESCE(cause, 'other')",
        "INSERT INTO counters (name, value) SELECT 'downloaded_bytes', COALESCE(SUM(bytes), 0) FROM job_attempts "
        "WHERE outcome = 'stored' AND bytes IS NOT NULL AND seconds IS NOT NULL "
        "UNION ALL SELECT 'download_seconds', COALESCE(SUM(seconds), 0) FROM job_attempts "
        "WHERE outcome = 'stored' AND bytes IS NOT NULL AND seconds IS NOT NULL",
        "INSERT INTO counters (name, value) SELECT 'polls', COALESCE(SUM(polls), 0) FROM known_batches "
        "UNION ALL SELECT 'found_by_poll', COUNT(*) FROM known_batches WHERE found_by_poll = true",
        "INSERT INTO counters (name, value) SELECT 'notifications:sent', COUNT(*) FROM notifications WHERE state = 'sent'",
    ):
        op.execute(sql)
    _backfill_histogram("duration", "(updated_at - planned_at)", DURATION_BUCKETS, f"{stored} AND planned_at IS NOT NULL")
    _backfill_histogram("bytes", "bytes", BYTES_BUCKETS, f"{stored} AND bytes IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "counters",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Float, nullable=False),
    )
    op.create_table(
        "counter_deltas",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
    )
    op.create_index("ix_jobs_updated", "jobs", ["updated_at", "batch_id"])
    op.create_index("ix_jobs_state_updated", "jobs", ["state", "updated_at", "batch_id"])
    _backfill()
    if op.get_bind().dialect.name == "postgresql":
        _create_postgres_triggers()
    else:
        _create_sqlite_triggers()


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table, events in COUNTS.items():
        if postgres:
            op.execute(f"DROP TRIGGER IF EXISTS counters_{table} ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS counters_{table}()")
        else:
            for event in events:
                op.execute(f"DROP TRIGGER IF EXISTS counters_{table}_{event.lower()}")
    op.drop_index("ix_jobs_state_updated", "jobs")
    op.drop_index("ix_jobs_updated", "jobs")
    op.drop_table("counter_deltas")
    op.drop_table("counters")

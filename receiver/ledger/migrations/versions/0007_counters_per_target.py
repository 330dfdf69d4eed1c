"""Notifications sent are counted per target, on `notification_deliveries` (revision 0006).

0004's trigger on `notifications` counted `notifications:sent` from its `state` column, which 0006
moved to one row per (batch, target). The trigger goes (on SQLite 0006's table rebuild already
dropped it), `notification_deliveries` gets one counting `notifications:sent:<target>`, and the
count so far (every event was the webhook's before 0006) becomes the webhook target's, so nothing
counted before is lost, pruned rows included.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SENT = "NEW.state = 'sent'"
SQLITE = (
    "CREATE TRIGGER counters_notification_deliveries_{event} AFTER {upper} ON notification_deliveries FOR EACH ROW{when} "
    "BEGIN INSERT INTO counters (name, value) SELECT 'notifications:sent:' || NEW.target, 1 WHERE {cond} "
    "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value; END"
)
POSTGRES_FUNCTION = """CREATE FUNCTION counters_notification_deliveries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
IF TG_OP = 'INSERT' THEN
INSERT INTO counter_deltas (name, value) SELECT 'notifications:sent:' || NEW.target, 1 WHERE NEW.state = 'sent';
ELSIF OLD.state <> NEW.state THEN
INSERT INTO counter_deltas (name, value) SELECT 'notifications:sent:' || NEW.target, 1 WHERE NEW.state = 'sent';
END IF;
RETURN NULL;
END
$$"""


def upgrade() -> None:
    for table in ("counters", "counter_deltas"):
        op.execute(f"UPDATE {table} SET name = 'notifications:sent:webhook' WHERE name = 'notifications:sent'")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS counters_notifications ON notifications")
        op.execute("DROP FUNCTION IF EXISTS counters_notifications()")
        op.execute(POSTGRES_FUNCTION)
        op.execute(
            "CREATE TRIGGER counters_notification_deliveries AFTER INSERT OR UPDATE ON notification_deliveries "
            "FOR EACH ROW EXECUTE FUNCTION counters_notification_deliveries()"
        )
    else:
        for event in ("insert", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS counters_notifications_{event}")
        op.execute(SQLITE.format(event="insert", upper="INSERT", when="", cond=SENT))
        op.execute(SQLITE.format(event="update", upper="UPDATE", when=" WHEN OLD.state <> NEW.state", cond=SENT))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS counters_notification_deliveries ON notification_deliveries")
        op.execute("DROP FUNCTION IF EXISTS counters_notification_deliveries()")
    else:
        for event in ("insert", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS counters_notification_deliveries_{event}")
    for table in ("counters", "counter_deltas"):
        op.execute(f"UPDATE {table} SET name = 'notifications:sent' WHERE name = 'notifications:sent:webhook'")

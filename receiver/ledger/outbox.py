"""The notification outbox: one `batch.stored` event per stored batch, claimed and sent like a job.

The row is written in the transaction that marks the job stored (`Ledger.mark_stored(notify=True)`),
so a crash can never leave a stored batch unannounced; the worker's notifier claims due rows under a
lease (leases.claim_due: one UPDATE of the oldest due row) so however many
workers run, each event is sent by one of them at a time.
"""

from __future__ import annotations

import json
import secrets
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..manifest import Manifest, rfc3339
from .leases import claim_due
from .schema import FAILED, NOTIFICATION_STATES, PENDING, SENT, Notification, notifications

if TYPE_CHECKING:
    import datetime as dt

EVENT_TYPE = "batch.stored"


def event_body(manifest: Manifest, moment: dt.datetime | None = None) -> bytes:
    """The JSON the consumer receives: `{"type", "timestamp", "data": <the manifest>}`."""
    import datetime as dt

    moment = moment or dt.datetime.now(dt.UTC)
    event = {"type": EVENT_TYPE, "timestamp": rfc3339(moment), "data": manifest.to_dict()}
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


def new_webhook_id() -> str:
    """A Standard Webhooks message id: unique per event, reused on every attempt of it."""
    return "msg_" + secrets.token_hex(16)


class Outbox:
    """Mixed into :class:`~receiver.ledger.Ledger`: the outbox's half of the ledger API."""

    if TYPE_CHECKING:
        dialect: str

        def begin(self) -> AbstractContextManager[Connection]: ...
        def connect(self) -> AbstractContextManager[Connection]: ...
        def _insert(self, table: sa.Table) -> Any: ...

    def _add_notification(self, conn: Connection, batch_id: str, manifest: Manifest, now: float) -> bool:
        """Write the batch's event unless it has one (a re-adopted manifest keeps its webhook-id)."""
        stmt = (
            self._insert(notifications)
            .values(
                batch_id=batch_id,
                webhook_id=new_webhook_id(),
                body=event_body(manifest),
                state=PENDING,
                attempts=0,
                next_attempt_at=now,
                retry_from=now,
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["batch_id"])
            .returning(notifications.c.batch_id)
        )
        return conn.execute(stmt).first() is not None

    def add_notification(self, batch_id: str, manifest: Manifest, now: float | None = None) -> bool:
        """Write an event for a batch stored before notifications were on (`notify --replay`)."""
        now = time.time() if now is None else now
        with self.begin() as conn:
            return self._add_notification(conn, batch_id, manifest, now)

    def claim_notification(self, owner: str, lease_seconds: float, now: float | None = None) -> Notification | None:
        """Take the oldest due event under a lease, or None. Due: pending, its next attempt in the
        past, and no live lease (a sender that died mid-POST loses it when the lease runs out)."""
        now = time.time() if now is None else now
        due = sa.and_(
            notifications.c.state == PENDING,
            notifications.c.next_attempt_at <= now,
            sa.or_(notifications.c.lease_expires_at.is_(None), notifications.c.lease_expires_at < now),
        )
        with self.begin() as conn:
            taken = claim_due(
                conn,
                notifications,
                due=due,
                order_by=notifications.c.next_attempt_at,
                values={"lease_owner": owner, "lease_expires_at": now + lease_seconds, "attempts": notifications.c.attempts + 1},
                returning=(
                    notifications.c.batch_id,
                    notifications.c.webhook_id,
                    notifications.c.body,
                    notifications.c.attempts,
                    notifications.c.retry_from,
                ),
            )
        if not taken:
            return None
        row = taken[0]
        return Notification(row.batch_id, row.webhook_id, bytes(row.body), row.attempts, row.retry_from)

    def notification_sent(self, batch_id: str, owner: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._settle(batch_id, owner, state=SENT, sent_at=now, last_error=None)

    def notification_failed(self, batch_id: str, owner: str, error: str, *, retry_at: float | None) -> None:
        """A failed attempt: pending again at `retry_at`, or `failed` for good when it is None."""
        if retry_at is None:
            self._settle(batch_id, owner, state=FAILED, last_error=error[:2000])
        else:
            self._settle(batch_id, owner, state=PENDING, next_attempt_at=retry_at, last_error=error[:2000])

    def _settle(self, batch_id: str, owner: str, **values: Any) -> None:
        with self.begin() as conn:
            conn.execute(
                notifications.update()
                .where(notifications.c.batch_id == batch_id, notifications.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None, **values)
            )

    def replay_notification(self, batch_id: str, now: float | None = None) -> bool:
        """Queue a batch's event again, with its webhook-id, and a fresh retry window. False when
        the batch has no event."""
        now = time.time() if now is None else now
        with self.begin() as conn:
            return bool(
                conn.execute(
                    notifications.update()
                    .where(notifications.c.batch_id == batch_id)
                    .values(state=PENDING, attempts=0, next_attempt_at=now, retry_from=now, last_error=None)
                ).rowcount
            )

    def notification(self, batch_id: str) -> dict[str, Any] | None:
        with self.connect() as conn:
            row = conn.execute(sa.select(notifications).where(notifications.c.batch_id == batch_id)).mappings().first()
            return dict(row) if row else None

    def _notification_stats(self, conn: Connection, values: dict[str, float]) -> dict[str, Any]:
        """Events by state, the oldest pending one, and the latest failures (`status`, /metrics).

        Pending and failed events are counted through the state index (they are work in flight, or
        waiting for an operator); sent ones are history, a counter (`values`: counters.read).
        """
        by_state = {
            state: int(conn.execute(sa.select(sa.func.count()).where(notifications.c.state == state)).scalar_one())
            for state in (PENDING, FAILED)
        }
        by_state[SENT] = int(values.get("notifications:sent", 0))
        oldest = conn.execute(sa.select(sa.func.min(notifications.c.created_at)).where(notifications.c.state == PENDING)).scalar()
        failed = [
            dict(r)
            for r in conn.execute(
                sa.select(
                    notifications.c.batch_id, notifications.c.webhook_id, notifications.c.attempts, notifications.c.last_error
                )
                .where(notifications.c.state == FAILED)
                .order_by(notifications.c.created_at.desc())
                .limit(20)
            ).mappings()
        ]
        return {
            "states": {state: by_state[state] for state in NOTIFICATION_STATES},
            "oldest_pending_at": oldest,
            "failed": failed,
        }

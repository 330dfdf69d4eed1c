"""The notification outbox: one `batch.stored` event per stored batch, and each target's delivery
of it, claimed and sent like a job.

The event and one delivery row per configured target are written in the transaction that marks the
job stored (`Ledger.mark_stored(notify=targets)`), so a crash can never leave a stored batch
unannounced. A target's notifier claims its due deliveries under a lease (leases.claim_due: one
UPDATE of the oldest due row), so however many workers run, each delivery is attempted by one of
them at a time, and a failing target never holds another one back.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..config import NOTIFY_TARGETS, WEBHOOK
from ..manifest import Manifest, rfc3339
from .leases import claim_due
from .schema import FAILED, NOTIFICATION_STATES, PENDING, SENT, Notification, notification_deliveries, notifications

if TYPE_CHECKING:
    import datetime as dt

EVENT_TYPE = "batch.stored"


def event_body(manifest: Manifest, moment: dt.datetime | None = None) -> bytes:
    """The JSON the consumer receives: `{"type", "timestamp", "data": <the manifest>}`."""
    import datetime as dt

    moment = moment or dt.datetime.now(dt.UTC)
    event = {"type": EVENT_TYPE, "timestamp": rfc3339(moment), "data": manifest.to_dict()}
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


def webhook_id_for(manifest: Manifest) -> str:
    """A Standard Webhooks message id: the same on every attempt, target and replay of an event.

    Derived from the batch and its manifest's `stored_at` rather than drawn at random, so that when
    retention has pruned a batch's rows and a late delivery makes the worker adopt its manifest
    again, the event written anew carries the id the consumer has already seen (and deduplicates)."""
    digest = hashlib.sha256(f"{manifest.batch_id}\n{rfc3339(manifest.stored_at)}".encode()).hexdigest()
    return "msg_" + digest[:32]


class Outbox:
    """Mixed into :class:`~receiver.ledger.Ledger`: the outbox's half of the ledger API."""

    if TYPE_CHECKING:
        dialect: str

        def begin(self) -> AbstractContextManager[Connection]: ...
        def connect(self) -> AbstractContextManager[Connection]: ...
        def _insert(self, table: sa.Table) -> Any: ...

    def _add_notification(self, conn: Connection, batch_id: str, manifest: Manifest, targets: Iterable[str], now: float) -> bool:
        """Write the batch's event unless it has one (a re-adopted manifest keeps its webhook-id),
        and a pending delivery for each target that has none. True when the event is new."""
        added = (
            conn.execute(
                self._insert(notifications)
                .values(batch_id=batch_id, webhook_id=webhook_id_for(manifest), body=event_body(manifest), created_at=now)
                .on_conflict_do_nothing(index_elements=["batch_id"])
                .returning(notifications.c.batch_id)
            ).first()
            is not None
        )
        self._add_deliveries(conn, batch_id, targets, now)
        return added

    def _add_deliveries(self, conn: Connection, batch_id: str, targets: Iterable[str], now: float) -> int:
        added = 0
        for target in targets:
            added += conn.execute(
                self._insert(notification_deliveries)
                .values(batch_id=batch_id, target=target, state=PENDING, attempts=0, next_attempt_at=now, retry_from=now)
                .on_conflict_do_nothing(index_elements=["batch_id", "target"])
            ).rowcount
        return added

    def add_notification(
        self, batch_id: str, manifest: Manifest, targets: Sequence[str] = (WEBHOOK,), now: float | None = None
    ) -> bool:
        """Write an event for a batch stored before notifications were on (`notify --replay`)."""
        now = time.time() if now is None else now
        with self.begin() as conn:
            return self._add_notification(conn, batch_id, manifest, targets, now)

    def claim_notification(
        self, owner: str, lease_seconds: float, now: float | None = None, *, target: str = WEBHOOK
    ) -> Notification | None:
        """Take the target's oldest due delivery under a lease, or None. Due: pending, its next
        attempt in the past, and no live lease (a sender that died mid-attempt loses it when the
        lease runs out)."""
        now = time.time() if now is None else now
        d = notification_deliveries.c
        due = sa.and_(
            d.target == target,
            d.state == PENDING,
            d.next_attempt_at <= now,
            sa.or_(d.lease_expires_at.is_(None), d.lease_expires_at < now),
        )
        with self.begin() as conn:
            taken = claim_due(
                conn,
                notification_deliveries,
                due=due,
                order_by=d.next_attempt_at,
                values={"lease_owner": owner, "lease_expires_at": now + lease_seconds, "attempts": d.attempts + 1},
                returning=(d.batch_id, d.attempts, d.retry_from),
            )
            if not taken:
                return None
            row = taken[0]
            event = conn.execute(
                sa.select(notifications.c.webhook_id, notifications.c.body).where(notifications.c.batch_id == row.batch_id)
            ).one()
        return Notification(row.batch_id, target, event.webhook_id, bytes(event.body), row.attempts, row.retry_from)

    def notification_sent(self, batch_id: str, owner: str, now: float | None = None, *, target: str = WEBHOOK) -> None:
        now = time.time() if now is None else now
        self._settle(batch_id, target, owner, state=SENT, sent_at=now, last_error=None)

    def notification_failed(
        self, batch_id: str, owner: str, error: str, *, retry_at: float | None, target: str = WEBHOOK
    ) -> None:
        """A failed attempt: pending again at `retry_at`, or `failed` for good when it is None."""
        if retry_at is None:
            self._settle(batch_id, target, owner, state=FAILED, last_error=error[:2000])
        else:
            self._settle(batch_id, target, owner, state=PENDING, next_attempt_at=retry_at, last_error=error[:2000])

    def _settle(self, batch_id: str, target: str, owner: str, **values: Any) -> None:
        d = notification_deliveries.c
        with self.begin() as conn:
            conn.execute(
                notification_deliveries.update()
                .where(d.batch_id == batch_id, d.target == target, d.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None, **values)
            )

    def replay_notification(
        self,
        batch_id: str,
        targets: Sequence[str] | None = None,
        now: float | None = None,
        *,
        manifest: Callable[[], Manifest | None] | None = None,
    ) -> bool:
        """Queue a batch's event again, with its webhook-id and a fresh retry window, for `targets`
        (a target added since the batch was stored gets its first delivery), or for every target
        that has a delivery of it when None. False when the batch has no event.

        Retention empties the body of a settled event after RECEIVER_NOTIFICATION_RETENTION_DAYS;
        `manifest` (reading the batch's manifest from storage) rebuilds it then. Without it, or
        without a manifest, such an event is not replayed: an empty body is never sent."""
        now = time.time() if now is None else now
        d = notification_deliveries.c
        body = None
        with self.connect() as conn:
            kept = conn.execute(
                sa.select(sa.func.length(notifications.c.body)).where(notifications.c.batch_id == batch_id)
            ).first()
        if kept is not None and not kept[0]:
            found = manifest() if manifest is not None else None
            if found is None:
                return False
            body = event_body(found)
        with self.begin() as conn:
            if conn.execute(sa.select(notifications.c.batch_id).where(notifications.c.batch_id == batch_id)).first() is None:
                return False
            if body is not None:
                conn.execute(notifications.update().where(notifications.c.batch_id == batch_id).values(body=body))
            again = notification_deliveries.update().where(d.batch_id == batch_id)
            if targets is not None:
                again = again.where(d.target.in_(targets))
            conn.execute(again.values(state=PENDING, attempts=0, next_attempt_at=now, retry_from=now, last_error=None))
            if targets is not None:
                self._add_deliveries(conn, batch_id, targets, now)
        return True

    def notification(self, batch_id: str, target: str = WEBHOOK) -> dict[str, Any] | None:
        """The event and the target's delivery of it, as one dict; None when there is no delivery."""
        deliveries = self.notification_deliveries(batch_id)
        return deliveries.get(target)

    def notification_deliveries(self, batch_id: str) -> dict[str, dict[str, Any]]:
        """Every target's delivery of the batch's event, each with the event's webhook-id and body."""
        d = notification_deliveries.c
        query = (
            sa.select(notifications, d.target, d.state, d.attempts, d.next_attempt_at, d.retry_from)
            .add_columns(d.lease_owner, d.lease_expires_at, d.last_error, d.sent_at)
            .join(notification_deliveries, notification_deliveries.c.batch_id == notifications.c.batch_id)
            .where(notifications.c.batch_id == batch_id)
        )
        with self.connect() as conn:
            return {row["target"]: dict(row) for row in conn.execute(query).mappings()}

    def _notification_stats(self, conn: Connection, values: dict[str, float]) -> dict[str, Any]:
        """Deliveries by target and state, the oldest pending one, and the latest failures
        (`status`, /metrics, the status page). `states` sums the targets.

        Pending and failed deliveries are counted through the (target, state) index: work in flight,
        or waiting for an operator. Sent ones are history, a counter per target (`values`:
        counters.read), so the cost does not grow with the events ever sent.
        """
        d = notification_deliveries.c
        by_target: dict[str, dict[str, int]] = {}
        targets_seen = {n.rpartition(":")[2] for n in values if n.startswith("notifications:sent:")}
        for target in (*NOTIFY_TARGETS, *sorted(targets_seen - set(NOTIFY_TARGETS))):
            counts = {
                state: int(conn.execute(sa.select(sa.func.count()).where(d.target == target, d.state == state)).scalar_one())
                for state in (PENDING, FAILED)
            }
            counts[SENT] = int(values.get(f"notifications:sent:{target}", 0))
            if any(counts.values()):
                by_target[target] = {state: counts[state] for state in NOTIFICATION_STATES}
        # Target first, as the index has it, so that both are index seeks.
        known = d.target.in_((*NOTIFY_TARGETS, *sorted(targets_seen)))
        oldest = conn.execute(sa.select(sa.func.min(d.retry_from)).where(known, d.state == PENDING)).scalar()
        failed = [
            dict(r)
            for r in conn.execute(
                sa.select(d.batch_id, d.target, notifications.c.webhook_id, d.attempts, d.last_error)
                .join(notifications, notifications.c.batch_id == d.batch_id)
                .where(known, d.state == FAILED)
                .order_by(d.retry_from.desc())
                .limit(20)
            ).mappings()
        ]
        targets = {t: by_target[t] for t in (*NOTIFY_TARGETS, *sorted(by_target)) if t in by_target}
        return {
            "states": {state: sum(counts[state] for counts in targets.values()) for state in NOTIFICATION_STATES},
            "targets": targets,
            "oldest_pending_at": oldest,
            "failed": failed,
        }

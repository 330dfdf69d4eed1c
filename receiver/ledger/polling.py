"""The ledger's side of the polling fallback: known batches and poll claims.

BatchRouter gives up on a delivery after its retry window, so a batch whose terminal delivery never
reached us would be lost for good. Every batch a signed delivery (or `receiver watch`) named is
*known*; the workers poll each known batch that has no job yet with `GET /v1/batches/{id}`. Polls
are claimed like jobs (leases.claim_due: one UPDATE of the due rows), so
however many workers run, each batch is polled about once per interval in total.

A poll that finds the batch ended queues its job with the same INSERT … ON CONFLICT as a terminal
delivery: the two paths meet at the one job row, so a delivery and a poll racing store it once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import counters, refused
from .leases import claim_due
from .schema import ENDED, NOT_FOUND, WATCHING, jobs, known_batches

#: What `watch` did with a batch.
QUEUED_NOW, ALREADY_QUEUED, WATCHED = "queued to be stored now", "already queued", "watched (polled until it ends)"


class PollingMixin:
    """Methods of :class:`~receiver.ledger.Ledger` for the polling fallback (see the module)."""

    if TYPE_CHECKING:  # provided by Ledger
        dialect: str

        def begin(self) -> AbstractContextManager[Connection]: ...
        def connect(self) -> AbstractContextManager[Connection]: ...
        def read(self, fn: Callable[[Connection], Any], *, fold: bool = False) -> Any: ...
        def _insert(self, table: sa.Table) -> Any: ...
        def _queue(self, conn: Connection, batch_id: str, *, origin: str, now: float, revive: tuple[str, ...]) -> bool: ...

    # --- making batches known ---------------------------------------------------------------------

    def _know(self, conn: Connection, batch_id: str, now: float) -> None:
        """Make a batch named by a delivery known, inside the delivery's transaction."""
        conn.execute(
            self._insert(known_batches)
            .values(batch_id=batch_id, source="delivery", state=WATCHING, first_seen_at=now, polls=0, found_by_poll=False)
            .on_conflict_do_nothing(index_elements=["batch_id"])
        )

    def watch(
        self,
        batch_id: str,
        *,
        status: str | None = None,
        ended: bool = False,
        poll_now: bool = False,
        now: float | None = None,
    ) -> str:
        """Make a batch known without any delivery: `receiver watch` and the status page's Watch form.

        One BatchRouter had not found before is watched again (the caller has seen it exists, or
        wants it looked at). `status` is what the caller's own `GET /v1/batches/{id}` answered;
        `ended` (a terminal status) queues its job at once, as a poll would. A caller that did not
        ask (the web side makes no API calls) passes `poll_now`, so the worker's next poll tick
        asks instead of waiting a whole interval. Answers QUEUED_NOW, ALREADY_QUEUED or WATCHED.
        """
        now = time.time() if now is None else now
        next_poll_at = now if poll_now else None
        with self.begin() as conn:
            conn.execute(
                self._insert(known_batches)
                .values(
                    batch_id=batch_id,
                    source="watch",
                    state=WATCHING,
                    first_seen_at=now,
                    next_poll_at=next_poll_at,
                    polls=0,
                    found_by_poll=False,
                )
                .on_conflict_do_update(
                    index_elements=["batch_id"],
                    set_={"state": WATCHING, "next_poll_at": next_poll_at, "first_seen_at": now},
                    where=known_batches.c.state == NOT_FOUND,
                )
            )
        if status is not None and ended:
            queued = self.record_poll(batch_id, None, status=status, state=ENDED, origin="watch", now=now)
            return QUEUED_NOW if queued else ALREADY_QUEUED
        return WATCHED

    # --- polls: worker side -----------------------------------------------------------------------

    def claim_polls(
        self, owner: str, *, interval: float, limit: int = 20, lease_seconds: float = 60.0, now: float | None = None
    ) -> list[str]:
        """Take up to `limit` due polls under a lease, oldest first, or none.

        Due means watched, with no job yet (a delivery or an earlier poll queued one), and its next
        poll in the past: a worker that starts after downtime finds the overdue ones due at once.
        The lease is `next_poll_at` itself, so a poller that dies leaves its polls due again after
        `lease_seconds`.
        """
        now = time.time() if now is None else now
        due = sa.and_(
            known_batches.c.state == WATCHING,
            sa.or_(
                known_batches.c.next_poll_at <= now,
                sa.and_(known_batches.c.next_poll_at.is_(None), known_batches.c.first_seen_at <= now - interval),
            ),
            ~sa.exists().where(jobs.c.batch_id == known_batches.c.batch_id),
        )
        # A read first: most ticks find nothing due, and a read takes no write lock on SQLite.
        with self.connect() as conn:
            if conn.execute(sa.select(known_batches.c.batch_id).where(due).limit(1)).first() is None:
                return []
        with self.begin() as conn:
            taken = claim_due(
                conn,
                known_batches,
                due=due,
                order_by=sa.func.coalesce(known_batches.c.next_poll_at, known_batches.c.first_seen_at + interval),
                values={"poll_owner": owner, "next_poll_at": now + lease_seconds},
                returning=(known_batches.c.batch_id,),
                limit=limit,
            )
        return [row.batch_id for row in taken]

    def record_poll(
        self,
        batch_id: str,
        owner: str | None,
        *,
        status: str,
        state: str = WATCHING,
        next_poll_at: float | None = None,
        origin: str = "poll",
        now: float | None = None,
    ) -> bool:
        """Record a poll's answer; for `ended`, queue the batch's job in the same transaction.

        Returns whether this call queued the job (False when a delivery, or another poll, had).
        `owner` None (for `receiver watch`) records it whoever holds the poll.
        """
        now = time.time() if now is None else now
        with self.begin() as conn:
            queued = state == ENDED and self._queue(conn, batch_id, origin=origin, now=now, revive=())
            where = known_batches.c.batch_id == batch_id
            if owner is not None:
                where = sa.and_(where, known_batches.c.poll_owner == owner)
            values: dict[str, Any] = {
                "state": state,
                "poll_owner": None,
                "next_poll_at": next_poll_at,
                "polls": known_batches.c.polls + 1,
                "last_polled_at": now,
                "last_status": status[:255],
            }
            if queued:
                values["found_by_poll"] = True
            conn.execute(known_batches.update().where(where).values(**values))
        return queued

    def release_polls(self, batch_ids: list[str], owner: str, *, now: float | None = None) -> None:
        """Give back polls claimed but not made (shutdown): due again at once for the next worker."""
        if not batch_ids:
            return
        now = time.time() if now is None else now
        with self.begin() as conn:
            conn.execute(
                known_batches.update()
                .where(known_batches.c.batch_id.in_(batch_ids), known_batches.c.poll_owner == owner)
                .values(poll_owner=None, next_poll_at=now)
            )

    def end_known_with_jobs(self, *, now: float | None = None) -> int:
        """Stop watching batches that have a job (a delivery queued it); periodic, so that the
        ingest path stays one INSERT. (Refused-delivery counts are pruned by retention.)"""
        with self.begin() as conn:
            return conn.execute(
                known_batches.update()
                .where(known_batches.c.state == WATCHING, sa.exists().where(jobs.c.batch_id == known_batches.c.batch_id))
                .values(state=ENDED, poll_owner=None)
            ).rowcount

    # --- reading ----------------------------------------------------------------------------------

    def known(
        self, states: tuple[str, ...] = (WATCHING, NOT_FOUND), *, limit: int | None = None, since: float | None = None
    ) -> list[dict[str, Any]]:
        """Known batches in `states` that have no job (for `receiver ls`): every one oldest first,
        or with `limit` the `limit` most recently seen, first seen at or after `since`."""
        query = sa.select(known_batches).where(
            known_batches.c.state.in_(states), ~sa.exists().where(jobs.c.batch_id == known_batches.c.batch_id)
        )
        if since is not None:
            query = query.where(known_batches.c.first_seen_at >= since)
        if limit is None:
            query = query.order_by(known_batches.c.first_seen_at)
        else:
            query = query.order_by(known_batches.c.first_seen_at.desc()).limit(limit)
        with self.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def polling_stats(self, now: float | None = None) -> dict[str, Any]:
        """Watched batches, the oldest one, polls made, batches found by polling, and deliveries
        refused for a bad signature in the last 24 hours (`receiver status`, `/metrics`)."""
        now = time.time() if now is None else now
        return self.read(lambda conn: self.read_polling_stats(conn, counters.read(conn), now), fold=True)

    def read_polling_stats(self, conn: Connection, values: dict[str, float], now: float) -> dict[str, Any]:
        """polling_stats() over an open read. Watched and not-found batches are counted through the
        state index (batches in flight, or few); polls and finds are counters (`values`)."""
        unjobbed = ~sa.exists().where(jobs.c.batch_id == known_batches.c.batch_id)
        watched = conn.execute(
            sa.select(sa.func.count(), sa.func.min(known_batches.c.first_seen_at)).where(
                known_batches.c.state == WATCHING, unjobbed
            )
        ).one()
        oldest = conn.execute(
            sa.select(known_batches.c.batch_id)
            .where(known_batches.c.state == WATCHING, unjobbed)
            .order_by(known_batches.c.first_seen_at)
            .limit(1)
        ).scalar()
        not_found = conn.execute(sa.select(sa.func.count()).where(known_batches.c.state == NOT_FOUND)).scalar_one()
        refused_24h = refused.refused_last_day(conn, now)
        return {
            "watched": int(watched[0]),
            "oldest_watched": oldest,
            "oldest_watched_age_seconds": None if watched[1] is None else round(now - watched[1]),
            "not_found": int(not_found),
            "polls": int(values.get("polls", 0)),
            "found_by_poll": int(values.get("found_by_poll", 0)),
            "refused_signature_24h": refused_24h,
        }

"""The webhook secrets `register` stored: accepted for ingest (cached), rotated with a grace period,
sealed at rest with RECEIVER_ENCRYPTION_KEY (secret_box), never shown, only their ages."""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .schema import SecretInfo, secrets
from .secret_box import SecretBox


class WebhookSecrets:
    """Mixed into :class:`~receiver.ledger.Ledger`: the secrets' half of the ledger API."""

    if TYPE_CHECKING:
        _box: SecretBox
        _secret_cache: tuple[float, tuple[str, ...]] | None
        _secret_cache_seconds: float
        _secret_refresh: threading.Lock

        def begin(self) -> AbstractContextManager[Connection]: ...
        def connect(self) -> AbstractContextManager[Connection]: ...

    def accepted_secrets(self, now: float | None = None, max_age: float | None = None) -> tuple[str, ...]:
        """Secrets `register` stored that are current or inside their grace period.

        Cached for about a second (`max_age` asks for a fresher answer): ingest calls this on every
        delivery. One caller refreshes an expired cache while the others keep the previous answer a
        moment longer: under gevent hundreds of requests would otherwise all query the database
        (and wait for its connections) in the same instant.
        """
        now = time.time() if now is None else now
        max_age = self._secret_cache_seconds if max_age is None else max_age
        cached = self._secret_cache
        if cached is not None and now - cached[0] < max_age:
            return cached[1]
        if cached is not None and not self._secret_refresh.acquire(blocking=False):
            return cached[1]  # another caller is refreshing it
        if cached is None:
            self._secret_refresh.acquire()
        try:
            cached = self._secret_cache
            if cached is not None and now - cached[0] < max_age:
                return cached[1]  # refreshed while we waited
            return self._read_secrets(now)
        finally:
            self._secret_refresh.release()

    def _read_secrets(self, now: float) -> tuple[str, ...]:
        with self.connect() as conn:
            rows = conn.execute(
                sa.select(secrets.c.secret)
                .where(sa.or_(secrets.c.expires_at.is_(None), secrets.c.expires_at > now))
                .order_by(secrets.c.id.desc())
            ).scalars()
            values = tuple(self._box.open(v) for v in rows)
        self._secret_cache = (now, values)
        return values

    def add_secret(self, secret: str, *, grace_seconds: float, now: float | None = None) -> None:
        """Make `secret` current; every other current secret stays accepted for `grace_seconds`."""
        now = time.time() if now is None else now
        with self.begin() as conn:
            conn.execute(secrets.update().where(secrets.c.expires_at.is_(None)).values(expires_at=now + grace_seconds))
            conn.execute(secrets.insert().values(secret=self._box.seal(secret), created_at=now, expires_at=None))
        self._secret_cache = None

    def stage_secret(self, secret: str, *, accepted_for: float, now: float | None = None) -> int:
        """Accept `secret` for `accepted_for` seconds without making it current; its row id.

        `register` proves a new secret with its self-test before BatchRouter hears of it: if the
        test or the PUT fails, the staged secret simply lapses and the current one is untouched.
        """
        now = time.time() if now is None else now
        with self.begin() as conn:
            secret_id = conn.execute(
                secrets.insert()
                .values(secret=self._box.seal(secret), created_at=now, expires_at=now + accepted_for)
                .returning(secrets.c.id)
            ).scalar_one()
        self._secret_cache = None
        return int(secret_id)

    def promote_secret(self, secret_id: int, *, grace_seconds: float, now: float | None = None) -> int:
        """Make the staged secret `secret_id` current; every other current secret stays accepted for
        `grace_seconds`. Answers how many were moved into their grace period."""
        now = time.time() if now is None else now
        with self.begin() as conn:
            retired = conn.execute(
                secrets.update()
                .where(secrets.c.expires_at.is_(None), secrets.c.id != secret_id)
                .values(expires_at=now + grace_seconds)
            ).rowcount
            conn.execute(secrets.update().where(secrets.c.id == secret_id).values(expires_at=None))
        self._secret_cache = None
        return int(retired or 0)

    def current_secret(self) -> str | None:
        with self.connect() as conn:
            found = conn.execute(
                sa.select(secrets.c.secret).where(secrets.c.expires_at.is_(None)).order_by(secrets.c.id.desc()).limit(1)
            ).scalar()
        return None if found is None else self._box.open(found)

    def check_secrets(self) -> None:
        """Raise SecretUnreadable now, at start-up, if RECEIVER_ENCRYPTION_KEY cannot open a secret."""
        self._read_secrets(time.time())

    @property
    def encrypts_secrets(self) -> bool:
        """Whether secrets are stored sealed (RECEIVER_ENCRYPTION_KEY is set)."""
        return self._box.encrypts

    def reseal_secrets(self) -> int:
        """Re-encrypt every stored secret under the first key (`receiver db rotate-key`)."""
        with self.begin() as conn:
            rows = conn.execute(sa.select(secrets.c.id, secrets.c.secret)).all()
            for row in rows:
                conn.execute(secrets.update().where(secrets.c.id == row.id).values(secret=self._box.reseal(row.secret)))
        self._secret_cache = None
        return len(rows)

    def secret_info(self, now: float | None = None) -> list[SecretInfo]:
        """Ages of the accepted secrets, never their values (for `receiver status`)."""
        now = time.time() if now is None else now
        with self.connect() as conn:
            rows = conn.execute(
                sa.select(secrets.c.id, secrets.c.created_at, secrets.c.expires_at)
                .where(sa.or_(secrets.c.expires_at.is_(None), secrets.c.expires_at > now))
                .order_by(secrets.c.id.desc())
            )
            return [SecretInfo(r.id, r.created_at, r.expires_at) for r in rows]

"""Webhook secrets at rest: sealed with RECEIVER_ENCRYPTION_KEY before they reach the ledger.

On a shared PostgreSQL every reader of the database could otherwise sign deliveries. A sealed value
is ``fernet:`` and a Fernet token; the first key seals, every key opens (MultiFernet), so a new key
goes first and the old one stays listed until `receiver db rotate-key` has re-sealed every secret.
A value without the prefix was stored unencrypted (no key then) and is read as it is.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..errors import SecretUnreadable

PREFIX = "fernet:"


class SecretBox:
    def __init__(self, keys: tuple[str, ...] = ()) -> None:
        self._fernet = MultiFernet([Fernet(key.encode()) for key in keys]) if keys else None

    @property
    def encrypts(self) -> bool:
        return self._fernet is not None

    def seal(self, secret: str) -> str:
        if self._fernet is None:
            return secret
        return PREFIX + self._fernet.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        if not stored.startswith(PREFIX):
            return stored
        if self._fernet is None:
            raise SecretUnreadable("the stored webhook secrets are encrypted; set RECEIVER_ENCRYPTION_KEY to their key")
        try:
            return self._fernet.decrypt(stored[len(PREFIX) :].encode()).decode()
        except InvalidToken:
            raise SecretUnreadable(
                "RECEIVER_ENCRYPTION_KEY does not decrypt the stored webhook secrets; list the key they were sealed with"
            ) from None

    def reseal(self, stored: str) -> str:
        """`stored` sealed under the first key (a plaintext value gets sealed for the first time)."""
        return self.seal(self.open(stored))

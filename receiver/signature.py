"""HMAC-SHA256 over the raw body, checked against several secrets in constant time.

BatchRouter signs the exact request bytes with the webhook secret and sends the lowercase hex digest
in `X-BatchRouter-Signature` (docs.batchrouter.com/guides/webhooks/). The key is the secret's UTF-8
bytes. We use `cryptography`'s HMAC so the comparison is its constant-time `verify`.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from .errors import SignatureError

HEADER = "X-BatchRouter-Signature"


def sign(secret: str, body: bytes) -> str:
    """The hex signature BatchRouter would send for `body` under `secret`."""
    mac = hmac.HMAC(secret.encode("utf-8"), hashes.SHA256())
    mac.update(body)
    return mac.finalize().hex()


def verify(header: str | None, body: bytes, secrets: Iterable[str]) -> str:
    """Return the secret that signed `body`, or raise :class:`SignatureError`.

    Every secret is tried even after a match would be found, so the time taken does not tell an
    attacker which secret (or whether any) matched.
    """
    digest = _parse_header(header)
    matched: str | None = None
    for secret in secrets:
        mac = hmac.HMAC(secret.encode("utf-8"), hashes.SHA256())
        mac.update(body)
        try:
            mac.verify(digest)
        except InvalidSignature:
            continue
        if matched is None:
            matched = secret
    if matched is None:
        raise SignatureError("signature does not match any accepted secret")
    return matched


def _parse_header(header: str | None) -> bytes:
    if not header:
        raise SignatureError(f"missing {HEADER} header")
    value = header.strip()
    # Not documented, but a `sha256=` prefix is the common convention elsewhere; accept it.
    if value[:7].lower() == "sha256=":
        value = value[7:]
    if len(value) != 64:
        raise SignatureError(f"{HEADER} is not a hex SHA-256 digest")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise SignatureError(f"{HEADER} is not a hex SHA-256 digest") from None

"""Standard Webhooks signing (standard-webhooks/standard-webhooks, `spec/standard-webhooks.md`).

A secret is `whsec_` followed by the base64 of 24 to 64 random bytes. Several secrets separated by
spaces mean a rotation in progress: every delivery then carries one signature per secret, so a
receiver that knows either one accepts it.

The signature of a message is `v1,` and the base64 of HMAC-SHA256(secret bytes, `{id}.{timestamp}.{body}`),
where the timestamp is the integer Unix time of the attempt. Each attempt is signed afresh: receivers
refuse timestamps more than a few minutes old, so a signature stored at enqueue time would fail every
late retry.

Standard library only: the CLI, the settings check and the delivery worker all use it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"  # nosec B105: the format's prefix, not a secret
_MIN_SECRET_BYTES = 24
_MAX_SECRET_BYTES = 64


def new_webhook_secret() -> str:
    """A fresh `whsec_` secret of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def parse_webhook_secrets(value: str) -> tuple[bytes, ...]:
    """The key bytes of each space-separated `whsec_` secret; ValueError (never quoting the value)
    when one is malformed."""
    keys = []
    for position, text in enumerate(value.split(), start=1):
        if not text.startswith(SECRET_PREFIX):
            raise ValueError(f"secret {position} must start with '{SECRET_PREFIX}'")
        try:
            key = base64.b64decode(text.removeprefix(SECRET_PREFIX), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"secret {position} is not valid base64 after '{SECRET_PREFIX}'") from None
        if not _MIN_SECRET_BYTES <= len(key) <= _MAX_SECRET_BYTES:
            raise ValueError(
                f"secret {position} must decode to {_MIN_SECRET_BYTES}-{_MAX_SECRET_BYTES} bytes "
                "(make one with `liveness-proxy webhooks secret`)"
            )
        keys.append(key)
    if not keys:
        raise ValueError("no secret given")
    return tuple(keys)


def webhook_signature(keys: Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64>` per key, separated by spaces."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys
    )


def webhook_headers(keys: Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": webhook_signature(keys, message_id, timestamp, body),
    }

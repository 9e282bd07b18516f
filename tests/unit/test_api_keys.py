"""API keys on their own: the shown-once format and its keyed hash, subject and scope checks, and
what is not taken for an API key (verification against the store is in integration/test_api_keys.py)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import pytest
from starlette.datastructures import Headers

from liveness_proxy.auth import ApiKeyAuthenticator, new_api_key
from liveness_proxy.store import ApiKeyStore

PEPPER = b"k" * 48


def test_key_format_and_stored_hash() -> None:
    issued = new_api_key(pepper=PEPPER, subject="alice", scopes=["liveness:admin"], name="n", now=1.0)
    prefix, key_id, secret = issued.key.split("_", 2)
    assert prefix == "lpk"
    assert key_id == issued.key_id
    assert len(secret) >= 40
    assert issued.stored.secret_hash == hmac.new(PEPPER, secret.encode(), hashlib.sha256).hexdigest()
    assert secret not in repr(issued.stored)
    assert issued.stored.scopes == ("liveness:admin",)


@pytest.mark.parametrize(
    ("subject", "scopes"), [("", []), ("a\nb", []), ("ok", ["has space"]), ("ok", ['q"'])]
)
def test_invalid_subject_or_scope_is_refused(subject: str, scopes: list[str]) -> None:
    with pytest.raises(ValueError, match=r"subject|scope"):
        new_api_key(pepper=PEPPER, subject=subject, scopes=scopes, name="n", now=1.0)


def test_bearer_without_key_prefix_is_not_taken_for_an_api_key() -> None:
    authenticator = ApiKeyAuthenticator(ApiKeyStore(None), pepper=PEPPER, cache_seconds=0)  # type: ignore[arg-type]
    assert asyncio.run(authenticator.authenticate(Headers({"authorization": "Bearer eyJhbGciOi"}))) is None


def test_a_key_cannot_be_made_already_expired() -> None:
    with pytest.raises(ValueError, match="future"):
        new_api_key(pepper=PEPPER, subject="alice", scopes=[], name="n", now=100.0, expires_at=100.0)
    issued = new_api_key(pepper=PEPPER, subject="alice", scopes=[], name="n", now=100.0, expires_at=101.0)
    assert issued.stored.state(100.0) == "active"
    assert issued.stored.state(101.0) == "expired"

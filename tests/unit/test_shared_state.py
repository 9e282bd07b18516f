"""The sealed token of the shared state, on its own: it opens only with its key and context (the
stores, leases and fleet behaviour are in integration/test_shared_state.py)."""

from __future__ import annotations

from liveness_proxy.upstream import (
    SharedToken,
    TokenCipher,
)

CONTEXT = "https://token.example/oauth/token\nclient\ndomain"
SECRET = b"a-client-secret-that-seals-the-token"


# -- the cipher ---------------------------------------------------------------------------------


def test_a_sealed_token_opens_only_with_its_key_and_context() -> None:
    token = SharedToken("sbx_the-access-token", expires_at=2e9, refresh_at=2e9 - 300)
    sealed = TokenCipher(SECRET, context=CONTEXT).seal(token)
    assert "sbx_the-access-token" not in sealed
    assert TokenCipher(SECRET, context=CONTEXT).open(sealed) == token
    assert TokenCipher(b"another-secret-entirely-xxxxxxxx", context=CONTEXT).open(sealed) is None
    assert TokenCipher(SECRET, context=CONTEXT + "-other-account").open(sealed) is None
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    assert TokenCipher(SECRET, context=CONTEXT).open(tampered) is None
    assert TokenCipher(SECRET, context=CONTEXT).open("garbage") is None
    assert TokenCipher(SECRET, context=CONTEXT).open("v1.!!!") is None

"""The demo identity provider: it plays the customer's IdP, so the demo page signs in with a real
ES256 JWT and the proxy's JWT path runs as it would in production."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

DEMO_ISSUER = "https://demo-idp.liveness-proxy.invalid"
DEMO_AUDIENCE = "liveness-proxy-demo"
DEMO_KEY_ID = "demo-idp-1"
DEMO_TOKEN_LIFETIME_SECONDS = 600


class DemoIdentityProvider:
    """Plays the customer's identity provider: an ES256 key pair made at start (the private half
    never leaves this process) and short-lived JWTs for one demo subject."""

    def __init__(
        self,
        *,
        subject: str,
        lifetime_seconds: int = DEMO_TOKEN_LIFETIME_SECONDS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.subject = subject
        self.lifetime_seconds = lifetime_seconds
        self._wall_clock = wall_clock
        self._private_key = ec.generate_private_key(ec.SECP256R1())

    def public_key_pem(self) -> bytes:
        """What the proxy is configured with (LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE)."""
        return self._private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def issue(self) -> str:
        now = int(self._wall_clock())
        claims = {
            "iss": DEMO_ISSUER,
            "aud": DEMO_AUDIENCE,
            "sub": self.subject,
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime_seconds,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._private_key, algorithm="ES256", headers={"kid": DEMO_KEY_ID})

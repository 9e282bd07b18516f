"""Who is calling: the identity every route decision is made on, whatever the credential was."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from starlette.datastructures import Headers

ADMIN_SCOPE = "liveness:admin"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller. `subject` owns sessions; `credential_id` names the credential
    (`key:<id>` for an API key, `jwt:<kid>` for a JWT) for the audit log and never contains a secret."""

    subject: str
    scopes: frozenset[str]
    credential_id: str
    # The customer's own business id (onboarding application, payout, …) for the sessions this
    # caller creates: from its credential (a JWT claim, or the host in library mode), never from a
    # request body, so the frontend cannot forge it.
    reference: str | None = None
    # The subject's commitment (store/subjects.py), set by the handlers once the caller is known:
    # what the audit chain, the Redis keys and the access log carry instead of the subject.
    commitment: str = ""

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes


class Authenticator(Protocol):
    """One way of turning request headers into a Caller.

    Returns None when the request carries no credential of this kind (so the next authenticator may
    try); raises `Unauthenticated` when it carries one that is invalid.
    """

    async def authenticate(self, headers: Headers) -> Caller | None: ...


def is_reference(value: object) -> bool:
    """A usable reference: 1-255 printable characters."""
    return isinstance(value, str) and 0 < len(value) <= 255 and value.isprintable()

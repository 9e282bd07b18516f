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

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes


class Authenticator(Protocol):
    """One way of turning request headers into a Caller.

    Returns None when the request carries no credential of this kind (so the next authenticator may
    try); raises `Unauthenticated` when it carries one that is invalid.
    """

    async def authenticate(self, headers: Headers) -> Caller | None: ...

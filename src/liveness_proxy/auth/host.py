"""Library mode: the host application's own authentication decides who calls the mounted proxy.

A host that already knows its user (a session cookie, its own OAuth middleware) passes a hook to
`create_app(..., authenticate_caller=hook)`. The hook sees the request before the proxy's own API
keys and JWTs do:

- it returns a `Caller` to authenticate the request as that subject, with those scopes;
- it returns None to let the proxy's own credentials decide (or refuse);
- it raises `Unauthenticated` (401) or `Forbidden` (403) to refuse the request itself.

Subjects share one namespace with API keys' and JWTs' subjects (the same subject owns the same
sessions): a host whose user ids could collide with them prefixes its own (`host:<id>`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.requests import HTTPConnection

from liveness_proxy.auth.api_keys import SCOPE_PATTERN, SUBJECT_PATTERN
from liveness_proxy.auth.caller import Caller, is_reference

HostAuthentication = Callable[[HTTPConnection], Awaitable[Caller | None]]

# Stored in every audit record and session binding (64 characters there): a name, never a secret.
CREDENTIAL_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@/+-]{1,64}")


class InvalidHostCaller(TypeError):
    """The host's hook returned something the proxy cannot record. A bug in the host, so it is
    answered as a 500 and logged, never silently accepted as some other identity."""


class HostAuthenticator:
    """Runs the host's hook and checks what it returns by the rules API keys and JWTs obey."""

    def __init__(self, hook: HostAuthentication) -> None:
        self._hook = hook

    async def authenticate(self, connection: HTTPConnection) -> Caller | None:
        caller = await self._hook(connection)
        if caller is None:
            return None
        if not isinstance(caller, Caller):
            raise InvalidHostCaller(
                "authenticate_caller must return a liveness_proxy.Caller or None, "
                f"not {type(caller).__name__}"
            )
        if not isinstance(caller.subject, str) or not (
            SUBJECT_PATTERN.fullmatch(caller.subject) and caller.subject.isprintable()
        ):
            raise InvalidHostCaller("Caller.subject must be 1-255 printable characters")
        if not isinstance(caller.credential_id, str) or not CREDENTIAL_ID_PATTERN.fullmatch(
            caller.credential_id
        ):
            raise InvalidHostCaller(
                "Caller.credential_id must be 1-64 characters of A-Z a-z 0-9 . _ : @ / + -"
            )
        if not isinstance(caller.scopes, frozenset) or not all(
            isinstance(scope, str) and SCOPE_PATTERN.fullmatch(scope) for scope in caller.scopes
        ):
            raise InvalidHostCaller("Caller.scopes must be a frozenset of scope names")
        if caller.reference is not None and not is_reference(caller.reference):
            raise InvalidHostCaller("Caller.reference must be None or 1-255 printable characters")
        return caller

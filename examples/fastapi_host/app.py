"""A FastAPI host application that mounts liveness-proxy at /liveness (library mode).

The host already has users, a login and a session cookie. It wants its logged-in users' browsers to
run liveness checks without ever holding a proxy API key, so it mounts the proxy inside itself and
tells it who is calling:

1. `create_app(settings, authenticate_caller=...)` builds the proxy with the host's hook;
2. `app.mount("/liveness", proxy)` puts the proxy's routes under /liveness;
3. the host's lifespan enters `proxy.running()` (Starlette does not run a mounted app's lifespan);
4. the hook turns the host's session cookie into a `Caller`; every session the proxy creates is
   bound to that subject, and every call is audited with it.

Run it (see README.md beside this file for the sandbox and the environment):

    uvicorn examples.fastapi_host.app:create_host_app --factory --port 8000

The users, passwords and in-memory session store are demo material: a real host has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, Field
from starlette.requests import HTTPConnection

from liveness_proxy import (
    ADMIN_SCOPE,
    Caller,
    Forbidden,
    HostAuthentication,
    Settings,
    Unauthenticated,
    create_app,
)

LIVENESS_PREFIX = "/liveness"
SESSION_COOKIE = "host_session"
# What the proxy writes into every audit record as the credential of a cookie caller: a name for the
# kind of credential, never the cookie itself.
HOST_CREDENTIAL_ID = "host-session"
# CSRF: every state-changing request a browser sends with the session cookie must carry this header.
CSRF_HEADER = "X-Requested-With"
CSRF_HEADER_VALUE = "liveness"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SESSION_IDLE_SECONDS = 30 * 60
SESSION_MAX_SECONDS = 8 * 60 * 60


# -- the host's users ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    display_name: str
    password_hash: str
    roles: frozenset[str]


# Demo users: (user id, display name, roles, scrypt hash of the password). The passwords are in
# README.md, public and demo-only; only their hashes are here. The user id is the proxy's subject.
_DEMO_ACCOUNTS: tuple[tuple[str, str, frozenset[str], str], ...] = (
    (
        "alice",
        "Alice",
        frozenset(),
        "scrypt$16384$8$1$d68bdd5e02db18574e83975f9f0816a6$"
        "62f749a487a75208867285f28788a472ccf2742d38536af9141e030dbeaec54c",
    ),
    (
        "bob",
        "Bob",
        frozenset(),
        "scrypt$16384$8$1$e9f260e0ca342101be1f8c2534676db7$"
        "495b73e9fceb39709181869d0bf3f36d02dd445e2ea503e66050db0813098774",
    ),
    (
        "auditor",
        "Auditor",
        frozenset({"admin"}),
        "scrypt$16384$8$1$db5fc70c7735d4f81180e8d47f2bb874$"
        "7cb7ac1332725d5304c95196553c9a6392fb07e69d8d825774cad1d5bf15de73",
    ),
)
DEMO_USERS: dict[str, User] = {
    user_id: User(user_id, display_name, password_hash, roles)
    for user_id, display_name, roles, password_hash in _DEMO_ACCOUNTS
}

# Checked when the username is unknown, so that a wrong username costs as much time as a wrong
# password and the login does not reveal which usernames exist.
_UNKNOWN_USER_HASH = "scrypt$16384$8$1$" + "00" * 16 + "$" + "00" * 32


def verify_password(password: str, stored: str) -> bool:
    """`stored` is `scrypt$n$r$p$salt-hex$hash-hex`; compared in constant time."""
    _, n, r, p, salt, expected = stored.split("$")
    derived = hashlib.scrypt(
        password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32
    )
    return hmac.compare_digest(derived, bytes.fromhex(expected))


def proxy_scopes(user: User) -> frozenset[str]:
    """The host's roles, in the proxy's terms: its admins may read any session's result."""
    return frozenset({ADMIN_SCOPE}) if "admin" in user.roles else frozenset()


# -- the host's sessions ---------------------------------------------------------------------------


@dataclass(slots=True)
class _HostSession:
    user_id: str
    created_at: float
    last_seen: float


class SessionStore:
    """Server-side sessions in memory (one process; a real host would use its database or Redis).

    The cookie holds a random token; the store keeps only its SHA-256, so a dump of the store holds
    no usable cookie. A session ends after SESSION_IDLE_SECONDS without use, SESSION_MAX_SECONDS in
    all, or at logout."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: dict[str, _HostSession] = {}

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    @staticmethod
    def _expired(session: _HostSession, now: float) -> bool:
        return (
            now - session.last_seen > SESSION_IDLE_SECONDS or now - session.created_at > SESSION_MAX_SECONDS
        )

    def create(self, user_id: str) -> str:
        token = secrets.token_urlsafe(32)
        now = self._clock()
        # Sessions nobody comes back to are dropped here, so the store does not grow without bound.
        for key in [key for key, session in self._sessions.items() if self._expired(session, now)]:
            del self._sessions[key]
        self._sessions[self._key(token)] = _HostSession(user_id=user_id, created_at=now, last_seen=now)
        return token

    def user_of(self, token: str) -> User | None:
        """The user a live session belongs to (and the session is used now), or None."""
        key = self._key(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock()
        if self._expired(session, now):
            del self._sessions[key]
            return None
        session.last_seen = now
        return DEMO_USERS.get(session.user_id)

    def end(self, token: str) -> None:
        self._sessions.pop(self._key(token), None)


# -- CSRF ------------------------------------------------------------------------------------------


def csrf_refusal(connection: HTTPConnection) -> str | None:
    """Why a cookie-authenticated request may not have come from our own pages, or None if it did.

    The cookie is SameSite=Strict, so a browser does not attach it to a request another site
    starts; that alone leaves older browsers and same-site (sibling subdomain) pages. Two more checks:

    - a custom header: a cross-origin page can send it only after a CORS preflight, which neither the
      host nor the proxy (without LIVENESS_PROXY_CORS_ORIGINS) grants; an HTML form cannot send it;
    - the Origin header, when the browser sends one, must be this very origin.

    Safe methods (GET, HEAD) change nothing and need neither."""
    if connection.scope.get("method", "GET") in SAFE_METHODS:
        return None
    if connection.headers.get(CSRF_HEADER) != CSRF_HEADER_VALUE:
        return (
            "A request authenticated by the session cookie needs the header "
            f"{CSRF_HEADER}: {CSRF_HEADER_VALUE}."
        )
    origin = connection.headers.get("origin")
    if origin is not None and origin != f"{connection.url.scheme}://{connection.url.netloc}":
        return "The request came from another origin."
    return None


async def require_csrf_header(request: Request) -> None:
    """The same rule for the host's own state-changing routes (a login CSRF is a CSRF too)."""
    refusal = csrf_refusal(request)
    if refusal is not None:
        raise HTTPException(status_code=403, detail=refusal)


# -- the hook: the host's session cookie -> the proxy's Caller ------------------------------------


def cookie_authentication(sessions: SessionStore) -> HostAuthentication:
    """The `authenticate_caller` hook given to the proxy. It runs before the proxy's own API keys and
    JWTs, on every liveness route:

    - no session cookie: None, and the proxy's own credentials decide (server-to-server callers with
      an API key or JWT keep working; a request with no credential at all gets the proxy's 401);
    - a cookie that names no live session: `Unauthenticated` (401), never a fall-through to another
      identity;
    - a live session on a state-changing request without the CSRF header, or from another origin:
      `Forbidden` (403);
    - otherwise the host user, as subject: sessions are bound to it and audit records carry it."""

    async def authenticate_caller(connection: HTTPConnection) -> Caller | None:
        token = connection.cookies.get(SESSION_COOKIE)
        if token is None:
            return None
        user = sessions.user_of(token)
        if user is None:
            raise Unauthenticated("The session has ended or is not valid; log in again.")
        refusal = csrf_refusal(connection)
        if refusal is not None:
            raise Forbidden(refusal)
        return Caller(subject=user.user_id, scopes=proxy_scopes(user), credential_id=HOST_CREDENTIAL_ID)

    return authenticate_caller


# -- the application -------------------------------------------------------------------------------


class LoginBody(BaseModel):
    username: Annotated[str, Field(min_length=1, max_length=64)]
    password: Annotated[str, Field(min_length=1, max_length=256)]


class Me(BaseModel):
    user_id: str
    display_name: str
    roles: list[str]
    liveness_admin: bool


def _me(user: User) -> Me:
    return Me(
        user_id=user.user_id,
        display_name=user.display_name,
        roles=sorted(user.roles),
        liveness_admin=ADMIN_SCOPE in proxy_scopes(user),
    )


def current_user(request: Request) -> User:
    """The host's own routes: the logged-in user, or 401."""
    sessions: SessionStore = request.app.state.sessions
    token = request.cookies.get(SESSION_COOKIE)
    user = sessions.user_of(token) if token is not None else None
    if user is None:
        raise HTTPException(status_code=401, detail="Not logged in.")
    return user


def create_host_app(settings: Settings | None = None) -> FastAPI:
    """The host app with the proxy mounted at /liveness. Without `settings`, the proxy's settings are
    read from the environment (and .env), as `liveness-proxy serve` reads them."""
    settings = settings if settings is not None else Settings.load()
    # Held by this app, not by the module: two apps built side by side share no sessions.
    sessions = SessionStore()

    # (1) The proxy, told how to recognise the host's users. `migrate=True` brings the database schema
    # up to date at start-up: fine for one process; with several workers, run
    # `liveness-proxy db upgrade` once before starting them instead.
    proxy = create_app(settings, authenticate_caller=cookie_authentication(sessions), migrate=True)

    # (3) Mounting does not start the proxy: the host's lifespan starts and stops its runtime
    # (database, upstream connection pools, token cache, audit writer).
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with proxy.running():
            yield

    app = FastAPI(title="Example host with liveness-proxy", lifespan=lifespan)
    app.state.sessions = sessions

    def cookie_secure(request: Request) -> bool:
        # Secure whenever the browser reached us over HTTPS (behind a TLS-terminating reverse proxy,
        # run uvicorn with --proxy-headers so the scheme is the browser's). Plain http is for
        # local development only.
        return request.url.scheme == "https"

    @app.post("/login", dependencies=[Depends(require_csrf_header)])
    async def login(body: LoginBody, request: Request, response: Response) -> Me:
        user = DEMO_USERS.get(body.username)
        stored = user.password_hash if user is not None else _UNKNOWN_USER_HASH
        # scrypt takes tens of milliseconds: off the event loop.
        if not await asyncio.to_thread(verify_password, body.password, stored) or user is None:
            raise HTTPException(status_code=401, detail="Wrong username or password.")
        # A new session at every login (and the old one ended): a session id planted before the
        # login never becomes an authenticated one.
        previous = request.cookies.get(SESSION_COOKIE)
        if previous is not None:
            sessions.end(previous)
        response.set_cookie(
            SESSION_COOKIE,
            sessions.create(user.user_id),
            max_age=SESSION_MAX_SECONDS,
            path="/",
            httponly=True,  # page scripts (and an XSS) cannot read it
            samesite="strict",  # never sent on a request another site starts
            secure=cookie_secure(request),
        )
        response.headers["Cache-Control"] = "no-store"
        return _me(user)

    @app.post("/logout", status_code=204, dependencies=[Depends(require_csrf_header)])
    async def logout(request: Request, response: Response) -> None:
        token = request.cookies.get(SESSION_COOKIE)
        if token is not None:
            sessions.end(token)
        response.delete_cookie(
            SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=cookie_secure(request)
        )

    @app.get("/me")
    async def me(user: Annotated[User, Depends(current_user)], response: Response) -> Me:
        response.headers["Cache-Control"] = "no-store"
        return _me(user)

    # (2) The proxy's routes under /liveness: /liveness/v1/liveness/session-token, ...,
    # /liveness/client/liveness-proxy-client.js. Its answers (Location headers included) carry the
    # prefix.
    app.mount(LIVENESS_PREFIX, proxy)
    return app

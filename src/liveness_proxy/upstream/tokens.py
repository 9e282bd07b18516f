"""The upstream access token: fetched (upstream/oauth.py), cached, refreshed ahead of expiry.

One token serves the whole process. At most one token request is in flight at a time (every caller
that needs a token while one is being fetched awaits that same fetch). A token in its refresh window
is still handed out while one background refresh runs. When the token endpoint fails, the cached
token is used until its real expiry. With none left, callers get `TokenUnavailable` at once instead
of piling up on a dead or hanging endpoint: no new attempt within a short backoff, and after it one
attempt in the background that nobody waits for. Only a first token (nothing failed before) is
waited for, bounded by the token request's own timeout.

An optional `TokenObserver` hears of every refresh (outcome and duration) and of every `get()`: a
hit is one answered from the cache without waiting for a token request.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import Link, Span

from liveness_proxy.errors import TokenUnavailable
from liveness_proxy.tracing import ActiveSpan, Tracing, new_root
from liveness_proxy.upstream.oauth import FetchedToken, TokenEndpointError
from liveness_proxy.upstream.token_store import SharedStateUnavailable, SharedToken, TokenStore


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str = field(repr=False)
    expires_at: float
    refresh_at: float


class TokenFetcher(Protocol):
    async def fetch(self) -> FetchedToken: ...


class TokenObserver(Protocol):
    """Told about refreshes and cache use, e.g. to count them; must not raise or block."""

    def token_refreshed(self, outcome: str, seconds: float) -> None:
        """`outcome` is "ok" or "failed"; `seconds` is how long the token request took."""

    def token_cache(self, hit: bool) -> None: ...


class TokenManager:
    """Hands out a valid upstream access token; see the module docstring for the policy."""

    def __init__(
        self,
        fetcher: TokenFetcher,
        *,
        refresh_margin: Callable[[float], float],
        failure_backoff_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_failure: Callable[[TokenEndpointError], None] | None = None,
        on_new_token: Callable[[str], None] | None = None,
        observer: TokenObserver | None = None,
        shared: SharedTokenPolicy | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._fetcher = fetcher
        self._tracing = tracing or Tracing.off()
        self._refresh_margin = refresh_margin
        self._failure_backoff = failure_backoff_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        self._on_failure = on_failure
        self._on_new_token = on_new_token
        self._observer = observer
        self._shared = shared
        # Identifies this process's lease in the shared store: unique per manager, never a secret.
        self._lease_owner = f"{os.getpid()}-{secrets.token_hex(8)}"
        self._token: AccessToken | None = None
        self._inflight: asyncio.Task[AccessToken] | None = None
        # The span of the refresh in flight: the requests that wait for it link to it.
        self._inflight_span: Span | None = None
        # After a failed attempt: no new attempt before _failed_until, and while _degraded, callers
        # without a token are answered at once instead of waiting on the next attempt.
        self._failed_until = 0.0
        self._degraded = False
        # A token the upstream rejects is replaced at most once per backoff interval, so an
        # upstream that rejects every token cannot turn each caller request into a token request.
        self._forced_refresh_not_before = 0.0
        # The last token the upstream rejected: never taken back from the shared store.
        self._rejected_value: str | None = None

    @property
    def cached(self) -> AccessToken | None:
        """The cached token if it has not expired."""
        token = self._token
        if token is not None and self._clock() < token.expires_at:
            return token
        return None

    async def get(self) -> AccessToken:
        now = self._clock()
        token = self._token
        if token is not None and now < token.expires_at:
            if now >= token.refresh_at and now >= self._failed_until:
                self._start_refresh()  # in the background: this caller keeps the still-valid token
            if self._observer is not None:
                self._observer.token_cache(True)
            return token
        if self._observer is not None:
            self._observer.token_cache(False)
        if now >= self._failed_until:
            attempt = self._start_refresh()
            if not self._degraded:
                return await self._wait_for(attempt)
            # The endpoint failed last time: this attempt runs in the background, callers don't queue.
        raise TokenUnavailable(
            "The upstream access token cannot be obtained right now.",
            retry_after_seconds=max(1, math.ceil(self._failed_until - now)),
        )

    def invalidate(self, rejected: AccessToken) -> None:
        """Drops the token the upstream rejected, unless a newer one already replaced it, or a
        rejected token was already replaced within the backoff interval."""
        if self._token is not rejected:
            return
        now = self._clock()
        if now < self._forced_refresh_not_before:
            return
        self._forced_refresh_not_before = now + self._failure_backoff
        self._rejected_value = rejected.value
        self._token = None

    async def close(self) -> None:
        task = self._inflight
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TokenUnavailable):
                await task

    async def _wait_for(self, attempt: asyncio.Task[AccessToken]) -> AccessToken:
        """Waits for the refresh in flight; with tracing on, in a span linked to the refresh's (one
        refresh serves every request waiting at that moment: it is no single request's child)."""
        refresh_span = self._inflight_span
        if refresh_span is None or not trace.get_current_span().is_recording():
            return await asyncio.shield(attempt)
        with self._tracing.span("upstream token wait", links=[Link(refresh_span.get_span_context())]):
            return await asyncio.shield(attempt)

    def _start_refresh(self) -> asyncio.Task[AccessToken]:
        if self._inflight is None or self._inflight.done():
            # A trace of its own, linked to the request that started it: a shared refresh.
            caller = trace.get_current_span().get_span_context()
            span = self._tracing.start_span(
                "upstream token refresh",
                context=new_root(),
                links=[Link(caller)] if caller.is_valid else None,
            )
            self._inflight_span = span
            task = asyncio.get_running_loop().create_task(
                self._refresh() if span is None else self._traced_refresh(span),
                name="upstream-token-refresh",
            )
            if span is not None:
                # Cancelled before its first step (a shutdown), the task never entered the span.
                task.add_done_callback(lambda _task: _end_if_open(span))
            # A background refresh may fail with nobody awaiting it; its failure is already recorded.
            task.add_done_callback(_consume_exception)
            self._inflight = task
        return self._inflight

    async def _traced_refresh(self, span: Span) -> AccessToken:
        with ActiveSpan(span):
            return await self._refresh()

    async def _refresh(self) -> AccessToken:
        shared = self._shared
        if shared is not None:
            try:
                return await self._refresh_shared(shared)
            except SharedStateUnavailable as exc:
                # Never worse than one process alone: this process asks for a token of its own.
                shared.unavailable(str(exc))
        token, _ = await self._fetch()
        return self._keep(token)

    async def _refresh_shared(self, shared: SharedTokenPolicy) -> AccessToken:
        """The fleet-wide single flight: take the token another process stored, or hold the lease
        and fetch one for everybody; see upstream/token_store.py."""
        store = shared.store
        # A real stopwatch: `_clock` may be a test's manual clock that stands still.
        deadline = time.monotonic() + shared.wait_seconds
        while True:
            stored = self._adoptable(await store.load())
            if stored is not None and self._wall_clock() < stored.refresh_at:
                return self._keep(self._local(stored))
            backoff = await store.backoff_remaining()
            # Checked again after every wait: the upstream may have rejected it meanwhile.
            stored = self._adoptable(stored)
            if backoff > 0:
                # Another process's token request failed a moment ago: nobody asks again before
                # the pause ends; a still-valid token keeps serving meanwhile.
                if stored is not None:
                    return self._keep(self._local(stored, recheck_seconds=backoff))
                self._failed_until = self._clock() + backoff
                self._degraded = True
                raise TokenUnavailable(
                    "The upstream access token cannot be obtained right now.",
                    retry_after_seconds=max(1, math.ceil(backoff)),
                )
            if await store.acquire_lease(self._lease_owner, shared.lease_seconds):
                try:
                    return await self._refresh_under_lease(shared)
                finally:
                    with contextlib.suppress(SharedStateUnavailable):
                        await store.release_lease(self._lease_owner)
            stored = self._adoptable(stored)
            if stored is not None:
                # Another process holds the lease and is refreshing: keep the still-valid token
                # and look again shortly for the new one.
                return self._keep(self._local(stored, recheck_seconds=shared.recheck_seconds))
            if time.monotonic() >= deadline:
                # The lease holder neither stored a token nor let its lease lapse in time: treated
                # like a failed attempt, so later callers are answered at once, not kept waiting.
                self._failed_until = self._clock() + 1
                self._degraded = True
                raise TokenUnavailable(
                    "The upstream access token cannot be obtained right now.", retry_after_seconds=1
                )
            await asyncio.sleep(shared.poll_seconds)

    async def _refresh_under_lease(self, shared: SharedTokenPolicy) -> AccessToken:
        store = shared.store
        # Read again now that the lease is ours: the previous holder may have stored a token between
        # our first read and its release, and that token must not be fetched a second time.
        stored = self._adoptable(await store.load())
        if stored is not None and self._wall_clock() < stored.refresh_at:
            return self._keep(self._local(stored))
        renewal = asyncio.get_running_loop().create_task(self._renew_lease(shared), name="token-lease")
        try:
            token, fetched = await self._fetch()
        except TokenUnavailable:
            with contextlib.suppress(SharedStateUnavailable):
                await store.start_backoff(self._failure_backoff)
            stored = self._adoptable(stored)
            if stored is not None:
                # Due but not expired: it keeps serving (fleet-wide) until the pause is over.
                return self._keep(self._local(stored, recheck_seconds=self._failure_backoff))
            raise
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
        self._keep(token)  # this process uses it at once; the others once it is stored
        try:
            await store.save(fetched)
        except SharedStateUnavailable as exc:
            shared.unavailable(str(exc))
        return token

    async def _renew_lease(self, shared: SharedTokenPolicy) -> None:
        # Renewed well before it lapses, so a slow token endpoint never lets a second process in.
        while True:
            await asyncio.sleep(shared.lease_seconds / 3)
            with contextlib.suppress(SharedStateUnavailable):
                await shared.store.renew_lease(self._lease_owner, shared.lease_seconds)

    def _adoptable(self, stored: SharedToken | None) -> SharedToken | None:
        if stored is None or stored.value == self._rejected_value:
            return None
        if self._wall_clock() >= stored.expires_at:
            return None
        return stored

    def _local(self, stored: SharedToken, *, recheck_seconds: float | None = None) -> AccessToken:
        """A stored token on this process's clock; `recheck_seconds` moves its refresh time close,
        for a token that is due but being refreshed elsewhere."""
        offset = self._clock() - self._wall_clock()
        expires_at = stored.expires_at + offset
        refresh_at = stored.refresh_at + offset
        if recheck_seconds is not None:
            refresh_at = min(expires_at, self._clock() + recheck_seconds)
        return AccessToken(value=stored.value, expires_at=expires_at, refresh_at=refresh_at)

    async def _fetch(self) -> tuple[AccessToken, SharedToken]:
        """One token request: the token on this process's clock and as it is shared."""
        # Lifetimes count from before the request: the token may have been minted just after we asked.
        started = self._clock()
        started_wall = self._wall_clock()
        # Durations by a real stopwatch: `_clock` may be a test's manual clock that stands still.
        stopwatch = time.perf_counter()
        try:
            fetched = await self._fetcher.fetch()
        except Exception as exc:
            failure = (
                exc
                if isinstance(exc, TokenEndpointError)
                else TokenEndpointError(f"token request failed ({type(exc).__name__})")
            )
            self._failed_until = self._clock() + self._failure_backoff
            self._degraded = True
            if self._observer is not None:
                self._observer.token_refreshed("failed", time.perf_counter() - stopwatch)
            if self._on_failure is not None:
                self._on_failure(failure)
            raise TokenUnavailable(
                "The upstream access token cannot be obtained right now.",
                retry_after_seconds=math.ceil(self._failure_backoff),
            ) from None
        lifetime = fetched.lifetime_seconds
        refresh_after = lifetime - self._refresh_margin(lifetime)
        if self._observer is not None:
            self._observer.token_refreshed("ok", time.perf_counter() - stopwatch)
        return (
            AccessToken(
                value=fetched.value, expires_at=started + lifetime, refresh_at=started + refresh_after
            ),
            SharedToken(
                value=fetched.value,
                expires_at=started_wall + lifetime,
                refresh_at=started_wall + refresh_after,
            ),
        )

    def _keep(self, token: AccessToken) -> AccessToken:
        if self._on_new_token is not None and (self._token is None or self._token.value != token.value):
            self._on_new_token(token.value)  # e.g. taught to the log redactor before any use
        self._token = token
        self._failed_until = 0.0
        self._degraded = False
        return token


@dataclass(frozen=True, slots=True)
class SharedTokenPolicy:
    """How this process shares the token with the rest of the deployment.

    `wait_seconds` bounds how long a caller without any token waits for another process's refresh;
    `lease_seconds` is the lease's time to live (renewed every third of it while the request runs,
    so a crashed holder blocks the others for at most that long); `recheck_seconds` is how soon a
    process that found a due token being refreshed elsewhere looks again; `unavailable` hears of a
    store failure (the process then uses a token of its own)."""

    store: TokenStore
    unavailable: Callable[[str], None]
    wait_seconds: float = 10.0
    lease_seconds: float = 5.0
    recheck_seconds: float = 1.0
    poll_seconds: float = 0.05


def _end_if_open(span: Span) -> None:
    if span.is_recording():
        span.end()


def _consume_exception(task: asyncio.Task[AccessToken]) -> None:
    if not task.cancelled():
        task.exception()

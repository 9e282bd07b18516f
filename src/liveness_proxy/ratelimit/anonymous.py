"""The limit before authentication: requests to the liveness and admin routes that carry no
credential, or one that fails, are counted per client address (`LIVENESS_PROXY_RATE_LIMIT_
UNAUTHENTICATED`, in Redis for the whole fleet when it is configured).

Only failures are counted, so honest callers never spend this budget. Once an address is over it,
this process remembers so until the window lets it in again: from then on, its requests are
refused before any authentication work (no key lookup, no signature check), by a dictionary lookup
that costs nothing in Redis. A caller from that address whose API key this process has verified
before is still served (`AddressGate.refusal` leaves that decision to the caller), so one attacker
behind a carrier NAT does not lock out the backend callers behind the same address.

Memory stays bounded under a flood from rotating addresses: blocked addresses are capped here
(`max_blocked`), and the per-address counters in this process's memory by the `SubjectLimits` the
wiring gives this gate (its own, with `local_max_keys`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

from liveness_proxy.errors import RateLimited
from liveness_proxy.ratelimit.subject import SubjectLimits

UNAUTHENTICATED: Final = "unauthenticated"
# The address of a request whose server gave none (a test transport, a Unix socket).
UNKNOWN_ADDRESS = "unknown"


class AddressGate:
    """Counts authentication failures per client address and refuses addresses that are over the
    limit. `max_blocked` bounds the memory of blocked addresses under a flood from rotating
    addresses: past it, the oldest block is forgotten (its next failure is counted again, and blocks
    again, so forgetting costs one storage call, never a free pass)."""

    def __init__(
        self,
        limits: SubjectLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_blocked: int = 100_000,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._on_reject = on_reject
        self._max_blocked = max_blocked
        # address -> (monotonic time the block ends, the refusal to answer until then)
        self._blocked: dict[str, tuple[float, RateLimited]] = {}

    @property
    def blocking(self) -> bool:
        """Whether any address is blocked here now (or was, until its next lookup)."""
        return bool(self._blocked)

    def refusal(self, address: str) -> RateLimited | None:
        """The 429 to answer now, before authentication, if `address` is over the limit."""
        if not self._blocked:
            return None
        entry = self._blocked.get(address)
        if entry is None:
            return None
        until, refused = entry
        remaining = until - self._clock()
        if remaining <= 0:
            del self._blocked[address]
            return None
        return RateLimited(
            str(refused.detail), retry_after_seconds=math.ceil(remaining), limit=UNAUTHENTICATED
        )

    def refused(self) -> None:
        """A refusal from `refusal` was answered (not every one is: a known key is served)."""
        if self._on_reject is not None:
            self._on_reject(UNAUTHENTICATED)

    async def failed(self, address: str) -> None:
        """Counts one failed (or missing) authentication from `address`; raises RateLimited, and
        blocks the address here until its window lets it in again, when that was one too many."""
        try:
            await self._limits.check(UNAUTHENTICATED, address)
        except RateLimited as refused:
            self._block(address, refused)
            raise

    def _block(self, address: str, refused: RateLimited) -> None:
        if address not in self._blocked and len(self._blocked) >= self._max_blocked:
            now = self._clock()
            for stale in [key for key, (until, _) in self._blocked.items() if until <= now]:
                del self._blocked[stale]
            if len(self._blocked) >= self._max_blocked:
                del self._blocked[next(iter(self._blocked))]
        self._blocked[address] = (self._clock() + refused.retry_after_seconds, refused)

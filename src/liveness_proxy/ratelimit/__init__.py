"""Per-subject rate limits, the daily attempt cap, and the global cap on concurrent upstream calls.

Limits are per *subject* (the authenticated caller), not per IP: one end user behind a carrier NAT
must not exhaust another's budget, and one user with many IPs must not escape theirs. When several
replicas must share the counts, the `limits` library counts them atomically in Redis
(`redis_limit_storage`); in this process's memory, lean counters with its arithmetic do
(`LocalSlidingWindows`, `LocalFixedWindows`).

`windows`: the in-process window counters; `subject`: the policy, `SubjectLimits` and the Redis
storage; `gate`: `UpstreamGate`; `anonymous`: `AddressGate`, the per-address limit before authentication.
"""

from liveness_proxy.ratelimit.anonymous import UNAUTHENTICATED, AddressGate
from liveness_proxy.ratelimit.gate import UpstreamGate
from liveness_proxy.ratelimit.subject import (
    DAILY_ATTEMPTS,
    DAILY_ATTEMPTS_TOTAL,
    LimitName,
    LimitPolicy,
    SubjectLimits,
    redis_limit_storage,
)
from liveness_proxy.ratelimit.windows import (
    FixedLimiter,
    LocalFixedWindows,
    LocalSlidingWindows,
    WindowLimiter,
)

__all__ = [
    "DAILY_ATTEMPTS",
    "DAILY_ATTEMPTS_TOTAL",
    "UNAUTHENTICATED",
    "AddressGate",
    "FixedLimiter",
    "LimitName",
    "LimitPolicy",
    "LocalFixedWindows",
    "LocalSlidingWindows",
    "SubjectLimits",
    "UpstreamGate",
    "WindowLimiter",
    "redis_limit_storage",
]

"""The one table from outbound HTTP errors to the API problems a caller of the proxy sees.

Like httpx's `HTTPCORE_EXC_MAP`: the liveness client (upstream/client.py) catches `HttpError` once
and asks `upstream_problem` what it means. Each row gives the outcome label the upstream metrics and
the circuit breaker count, and the `UpstreamError` (liveness_proxy/errors.py) answered to the caller.
The most specific row wins (the error's class hierarchy is walked, nearest first), so a refinement
(`TlsError` under `ConnectError`) answers as its parent until it gets a row of its own.

Only the liveness calls answer with these problems: the token fetch and the JWKS fetch turn HTTP
errors into their own errors (`TokenEndpointError`, `JwksError`), which the token manager and the
JWKS cache handle. This is the only place in http/ that makes an API problem.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from liveness_proxy.errors import UpstreamError, UpstreamMalformed, UpstreamTimeout, UpstreamUnavailable
from liveness_proxy.http.errors import (
    ConnectError,
    EncodedResponse,
    ExchangeError,
    HttpError,
    ResponseTooLarge,
    Timeout,
)


@dataclass(frozen=True, slots=True)
class Problem:
    """`outcome`: the label of the failed exchange in metrics; `make`: the problem for the caller."""

    outcome: str
    make: Callable[[HttpError], UpstreamError]


def _status(error: HttpError) -> int | None:
    status = getattr(error, "status", None)
    return status if isinstance(status, int) else None


HTTP_PROBLEMS: Mapping[type[HttpError], Problem] = {
    Timeout: Problem("timeout", lambda _: UpstreamTimeout("The liveness service did not answer in time.")),
    ResponseTooLarge: Problem(
        "malformed",
        lambda error: UpstreamMalformed(
            "The liveness service sent a response that is too large.", upstream_status=_status(error)
        ),
    ),
    EncodedResponse: Problem(
        "malformed",
        lambda error: UpstreamMalformed(
            "The liveness service sent an encoded response.", upstream_status=_status(error)
        ),
    ),
    ConnectError: Problem(
        "connect_error", lambda _: UpstreamUnavailable("The liveness service could not be reached.")
    ),
    # A reset, an early close, or an answer that is not HTTP: the connection failed us.
    ExchangeError: Problem(
        "connection_error", lambda _: UpstreamUnavailable("The connection to the liveness service failed.")
    ),
    HttpError: Problem(
        "connection_error", lambda _: UpstreamUnavailable("The connection to the liveness service failed.")
    ),
}


def upstream_problem(error: HttpError) -> tuple[str, UpstreamError]:
    """The outcome label and the API problem for `error`, by its most specific row."""
    for cls in type(error).__mro__:
        problem = HTTP_PROBLEMS.get(cls)
        if problem is not None:
            return problem.outcome, problem.make(error)
    raise AssertionError("HttpError has a row")  # unreachable: the last row is the base class

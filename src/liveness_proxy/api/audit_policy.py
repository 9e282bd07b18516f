"""The audit policy: every liveness request, accepted or refused, leaves exactly one audit record,
committed before the answer is sent, so that a caller never holds a result the audit log does not
know about. Separate from the handlers, which only say what they learned (`AuditContext`).

The exception is a request that never got past authentication (no credential, a failing one, or a
429 of the per-address limit on those): it is counted in its window's aggregate record instead
(`store/failed_authentications.py`), so that a flood of bad credentials writes a bounded number of
rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from liveness_proxy.auth import Caller, credential_kind
from liveness_proxy.errors import ProblemError, RateLimited, StoreUnavailable, Unauthenticated, UpstreamError
from liveness_proxy.middleware import client_address, request_id_of
from liveness_proxy.ratelimit import UNAUTHENTICATED
from liveness_proxy.store import AuditLog, AuditRecord, is_store_outage
from liveness_proxy.store.failed_authentications import FailedAuthentications
from liveness_proxy.tracing import Tracing


@dataclass(slots=True)
class AuditContext:
    """What a liveness handler learned, for its audit record."""

    action: str
    caller: Caller | None = None
    session_id: str | None = None
    upstream_status: int | None = None
    # Facts of this request for the record's hashed `detail` (canonical JSON): a result read's source.
    detail: str | None = None
    written: bool = False
    started: float = field(default_factory=time.perf_counter)

    def record(self, request_id: str, status: int, problem: str | None, occurred_at: float) -> AuditRecord:
        return AuditRecord(
            occurred_at=occurred_at,
            request_id=request_id,
            subject=None if self.caller is None else self.caller.subject,
            subject_commitment=None if self.caller is None else self.caller.commitment,
            credential_id=None if self.caller is None else self.caller.credential_id,
            action=self.action,
            session_id=self.session_id,
            status=status,
            upstream_status=self.upstream_status,
            latency_ms=round((time.perf_counter() - self.started) * 1000, 3),
            problem=problem,
            detail=self.detail,
        )


AuditedHandler = Callable[[Request, AuditContext], Awaitable[Response]]


class AuditPolicy:
    """Runs a handler and writes its one record, whatever the outcome."""

    def __init__(
        self,
        audit_log: AuditLog,
        *,
        failed_authentications: FailedAuthentications,
        logger: structlog.typing.FilteringBoundLogger,
        wall_clock: Callable[[], float],
        tracing: Tracing | None = None,
        on_unavailable: Callable[[], None],
    ) -> None:
        """`on_unavailable()` is told of every record the store could not take (e.g. a metric)."""
        self._audit_log = audit_log
        self._tracing = tracing or Tracing.off()
        self._failed_authentications = failed_authentications
        self._logger = logger
        self._wall_clock = wall_clock
        self._on_unavailable = on_unavailable

    async def run(self, request: Request, action: str, handler: AuditedHandler) -> Response:
        audit = AuditContext(action=action)
        try:
            response = await handler(request, audit)
        except ProblemError as error:
            if audit.caller is None and is_authentication_failure(error):
                request.scope["state"]["upstream_status"] = None
                self._failed_authentications.count(
                    credential_kind(request.headers),
                    client_address(request.scope),
                    request_id_of(request.scope),
                    refused_by_limit=isinstance(error, RateLimited),
                )
                delay = self._failed_authentications.answer_delay_seconds
                if delay > 0:
                    await asyncio.sleep(delay)
                raise
            if isinstance(error, UpstreamError) and error.upstream_status is not None:
                audit.upstream_status = error.upstream_status
            await self._append_best_effort(request, audit, error.response_status(), error.slug)
            raise
        except ClientDisconnect:
            # The caller went away mid-body: nothing was forwarded. 499, as nginx records it.
            await self._append(request, audit, 499, "client-disconnected")
            raise
        except asyncio.CancelledError:
            # Cancelled (shutdown past its grace period) possibly after the upstream call went out:
            # the record is queued before the first wait, and closing the audit log writes it.
            await self._append(request, audit, 499, "cancelled")
            raise
        except Exception as exc:
            if is_store_outage(exc):
                # The database is unreachable: a 503 the caller can retry, not a 500 (a bug). Its
                # record is attempted like any other, and is lost only if the store still is.
                outage = StoreUnavailable()
                await self._append_best_effort(request, audit, outage.status, outage.slug)
                raise outage from None
            # A bug: still one record (if the store takes it), then a 500.
            await self._append(request, audit, 500, "internal-error")
            raise
        try:
            await self._append(request, audit, response.status_code, None)
        except Exception as exc:
            if not is_store_outage(exc):
                raise
            # The answer is ready but its record cannot be written: it is not sent.
            self._logger.error(  # noqa: TRY400 - the reason is the class name; no traceback in logs
                "audit_unavailable", reason=type(exc).__name__, status=response.status_code
            )
            self._on_unavailable()
            raise StoreUnavailable() from None
        return response

    async def _append_best_effort(
        self, request: Request, audit: AuditContext, status: int, problem: str
    ) -> None:
        """For error answers only: the caller is told of the failure even when it cannot be
        recorded (a refusal acknowledges nothing); the log says so."""
        try:
            await self._append(request, audit, status, problem)
        except Exception as exc:
            if not is_store_outage(exc):
                raise
            self._logger.error(  # noqa: TRY400 - the reason is the class name; no traceback in logs
                "audit_unavailable", reason=type(exc).__name__, status=status
            )
            self._on_unavailable()

    async def _append(self, request: Request, audit: AuditContext, status: int, problem: str | None) -> None:
        # For the access log line, which the middleware writes after the response.
        request.scope["state"]["upstream_status"] = audit.upstream_status
        if audit.written:
            return
        audit.written = True
        record = audit.record(request_id_of(request.scope), status, problem, self._wall_clock())
        if self._tracing.tracer is None:
            await self._audit_log.append(record)
            return
        # The wait for the group commit that makes this record durable (the answer waits on it).
        with self._tracing.span("audit commit"):
            await self._audit_log.append(record)


def is_authentication_failure(error: ProblemError) -> bool:
    """A refusal for want of a valid credential: audited in aggregate, not one record each."""
    return isinstance(error, Unauthenticated) or (
        isinstance(error, RateLimited) and error.limit == UNAUTHENTICATED
    )

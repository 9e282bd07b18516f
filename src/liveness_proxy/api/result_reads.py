"""Result reads: the answer to a caller's `GET .../result`, once the handler has authenticated the
caller, counted its limit and checked that it owns the session (or is an admin). Nothing here
decides who may read: a foreign or unknown session was a 404 before any of this runs, so an answer
is only ever shared among callers who each passed that check for the same session.

An answer comes from one of three sources, which the `X-Liveness-Result-Source` header, the audit
record's `detail` (`{"result_source": ...}`) and the `liveness_proxy_result_reads_total` metric say:

- `stored`: the session is final and its terminal answer is in the proxy's own record
  (api/final_results.py): no Cynopsis call, no upstream slot;
- `upstream`: this caller's read made the Cynopsis call;
- `shared`: the answer of a call another caller's read made, still in flight when this one came or
  answered less than LIVENESS_PROXY_RESULT_REUSE_SECONDS ago (`upstream/single_flight.py`).

The call, the verdict it may record (with the stored copy of the answer, in the same UPDATE) and the
encoding of the answer happen once per call, in a task of their own, not once per caller. Each
caller is still checked on its own: the call's answer was refused for the caller that started it if
it held that caller's credential (upstream/client.py); every other caller's credentials are looked
for in it by the same function before it is given the answer.
"""

from __future__ import annotations

import functools
from typing import Literal

import orjson
from starlette.responses import Response

from liveness_proxy.api.audit_policy import AuditContext
from liveness_proxy.api.bodies import encode_upstream
from liveness_proxy.api.declared import DeclaredAnswer, result_answer, without_id_fields
from liveness_proxy.api.final_results import FinalResults
from liveness_proxy.api.responses import RawHeadersResponse
from liveness_proxy.privacy import derived_pass
from liveness_proxy.store import SessionOwner, SessionVerdict
from liveness_proxy.store.verdicts import verdict_of
from liveness_proxy.upstream import ShapedResult
from liveness_proxy.upstream.echoes import refuse_echoed_secrets
from liveness_proxy.wiring import RequestPolicy, Service

ResultSource = Literal["upstream", "shared", "stored"]
RESULT_SOURCES: tuple[ResultSource, ...] = ("upstream", "shared", "stored")
RESULT_SOURCE_HEADER = "X-Liveness-Result-Source"
# Each source's audit detail and answer head, made once: a read pays nothing to encode them.
_DETAIL: dict[ResultSource, str] = {
    source: orjson.dumps({"result_source": source}).decode() for source in RESULT_SOURCES
}
_HEAD: dict[ResultSource, list[tuple[bytes, bytes]]] = {
    source: [
        (b"content-type", b"application/json"),
        (b"cache-control", b"no-store"),
        (RESULT_SOURCE_HEADER.lower().encode(), source.encode()),
    ]
    for source in RESULT_SOURCES
}


class ResultReads:
    """The result reads of one running service (built once, with the handlers)."""

    def __init__(self, service: Service, policy: RequestPolicy) -> None:
        self._service = service
        self._flights = service.result_flights
        self._answer = DeclaredAnswer(
            result_answer(policy.session_id_fields),
            extra_fields=policy.extra_response_fields,
            biometrics=service.biometrics,
        )
        self._id_fields = policy.session_id_fields
        self._pass_threshold = policy.pass_threshold
        self._final: FinalResults | None = None
        if policy.final_result_store_inactive is None:
            self._final = FinalResults(
                session_id_fields=policy.session_id_fields,
                extra_response_fields=policy.extra_response_fields,
                biometric_fields=policy.biometric_fields,
                biometric_max_string_bytes=policy.biometric_max_string_bytes,
                pass_threshold=policy.pass_threshold,
            )

    async def read(
        self, owner: SessionOwner, request_id: str, caller_secrets: tuple[str, ...], audit: AuditContext
    ) -> Response:
        """The answer to one caller allowed to read `owner`'s session; `caller_secrets` are the
        credentials it presented (none may be in its answer)."""
        final = self._final
        if final is not None and owner.final_result is not None:
            body = final.body(owner.final_result)
            if body is not None:
                audit.detail = _DETAIL["stored"]  # a refusal below says where it came from too
                # Written from an answer already checked for its own reader's credentials; this
                # reader's own are looked for as in any answer.
                refuse_echoed_secrets(body, body, caller_secrets, status=None)
                return self._answered("stored", body, audit)
        # Only the owner's own read stores a copy: an admin's credentials are not the owner's, and
        # an answer is checked only against the credentials of the read that made the call.
        by_owner = audit.caller is not None and audit.caller.subject == owner.subject
        joined = self._flights.join(
            owner.session_id,
            functools.partial(self._read_upstream, owner, request_id, caller_secrets, may_store=by_owner),
        )
        audit.detail = _DETAIL["upstream" if joined.started else "shared"]  # a shared failure says so
        shaped = await joined.value()
        audit.upstream_status = shaped.status
        # A joiner whose starter left made the call itself after all (`started` says so then).
        if not joined.started:
            shaped.refuse_caller_secrets(caller_secrets)
        return self._answered("upstream" if joined.started else "shared", shaped.body, audit)

    def _answered(self, source: ResultSource, body: bytes, audit: AuditContext) -> Response:
        audit.detail = _DETAIL[source]
        self._service.metrics.result_read(source)
        return RawHeadersResponse(body, 200, _HEAD[source])

    async def _read_upstream(
        self, owner: SessionOwner, request_id: str, caller_secrets: tuple[str, ...], *, may_store: bool
    ) -> ShapedResult:
        """The one Cynopsis call of a flight (its starter's request id and credentials), the verdict
        it may record, and the answer as every caller of the flight is given it."""
        service = self._service
        session_id = owner.session_id
        async with service.upstream_gate.slot():
            # The client refuses a result for another session, or one that holds a credential.
            answer = await service.cynopsis.get_result(session_id, request_id, caller_secrets=caller_secrets)
        reduced, dropped = self._answer.reduce(answer.payload)
        payload = without_id_fields(reduced, self._id_fields)
        if any(name in reduced for name in self._id_fields):
            payload = {"session_id": session_id, **payload}
        if dropped:
            payload["redacted_fields"] = dropped
        shown = verdict_of(answer.payload, recorded_at=service.wall_clock(), request_id=request_id)
        final = self._final if may_store else None
        stored = None if final is None or shown is None else final.encode(payload)
        stands = await service.record_read(owner, answer.payload, request_id, final_result=stored)
        if (
            final is not None
            and stored is not None
            and _same_verdict(stands.verdict, shown)
            and not final.is_current(stands.final_result)
        ):
            # The verdict was recorded without this copy (by the finalizer, an admin's refresh, or
            # before the store existed), or with one made under another policy.
            await service.verdicts.keep_final_result(stands, stored, policy=final.prefix)
        if self._pass_threshold is not None:
            payload["passed"] = derived_pass(payload, self._pass_threshold)
        body = encode_upstream(payload, answer.status)
        return ShapedResult(body, answer.status, answer.raw, answer.canonical)


def _same_verdict(stands: SessionVerdict | None, shown: SessionVerdict | None) -> bool:
    """Whether the answer shows the verdict that stands: only such an answer is stored."""
    return (
        stands is not None
        and shown is not None
        and stands.status == shown.status
        and stands.confidence == shown.confidence
    )

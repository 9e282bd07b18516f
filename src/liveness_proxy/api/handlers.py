"""The liveness handlers: the three proxied calls (the admin's routes are in `admin.py`).

A handler is built once the service runs, with everything it uses as constructor arguments. Each
one authenticates, limits, validates and calls upstream; the audit policy around it writes the
record (`audit_policy.py`).
"""

from __future__ import annotations

import dataclasses

import orjson
from opentelemetry.util.types import AttributeValue
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from liveness_proxy.api.audit_policy import AuditContext, AuditPolicy
from liveness_proxy.api.bodies import encode_forwarded, encode_upstream, read_json_object, session_id_from
from liveness_proxy.api.declared import (
    SESSION_TOKEN_ANSWER,
    DeclaredAnswer,
    DeclaredBody,
    session_answer,
    without_id_fields,
)
from liveness_proxy.api.idempotency import CallGoesOut, IdempotentCreates, idempotency_key_of
from liveness_proxy.api.paths import SESSION_ID_RULE, is_session_id, session_result_location
from liveness_proxy.api.responses import json_response
from liveness_proxy.api.result_reads import ResultReads
from liveness_proxy.auth import Caller, HostAuthenticator, refuse_repeated_credentials
from liveness_proxy.auth.session_tokens import TakenToken
from liveness_proxy.errors import BadRequest, NotFound, Unauthenticated, UpstreamError, UpstreamMalformed
from liveness_proxy.middleware import client_address, request_id_of
from liveness_proxy.ratelimit import LimitName
from liveness_proxy.schemas import CreateSessionRequest, SessionTokenRequest
from liveness_proxy.store import SessionAlreadyBound, SessionOwner
from liveness_proxy.wiring import RequestPolicy, Service

# Each limit's span attributes, built once.
_LIMIT_ATTRIBUTES: dict[str, dict[str, AttributeValue]] = {
    name: {"liveness_proxy.limit": name} for name in ("session_token", "create_session", "result")
}


class LivenessHandlers:
    """The liveness routes of one running service."""

    def __init__(
        self,
        service: Service,
        policy: RequestPolicy,
        *,
        host_authentication: HostAuthenticator | None = None,
    ) -> None:
        self._service = service
        self._policy = policy
        self._host_authentication = host_authentication
        self._audit = AuditPolicy(
            service.audit,
            failed_authentications=service.failed_authentications,
            logger=service.logger,
            wall_clock=service.wall_clock,
            tracing=service.tracing,
            on_unavailable=service.metrics.audit_unavailable,
        )
        self._token_body = DeclaredBody(SessionTokenRequest, extra_fields=policy.extra_body_fields)
        self._create_body = DeclaredBody(CreateSessionRequest, extra_fields=policy.extra_body_fields)
        extra, biometrics = policy.extra_response_fields, service.biometrics
        self._token_answer = DeclaredAnswer(SESSION_TOKEN_ANSWER, extra_fields=extra, biometrics=biometrics)
        self._session_answer = DeclaredAnswer(
            session_answer(policy.session_id_fields), extra_fields=extra, biometrics=biometrics
        )
        self._result_reads = ResultReads(service, policy)
        self._idempotent = IdempotentCreates(
            service.idempotency,
            fingerprint=service.hashes.fingerprint,
            ttl_seconds=policy.idempotency_ttl_seconds,
            lease_seconds=policy.idempotency_lease_seconds,
            wall_clock=service.wall_clock,
            logger=service.logger,
        )

    async def session_token(self, request: Request) -> Response:
        return await self._audit.run(request, "session_token.create", self._session_token)

    async def create_session(self, request: Request) -> Response:
        return await self._audit.run(request, "session.create", self._create_session)

    async def result(self, request: Request) -> Response:
        return await self._audit.run(request, "result.read", self._result)

    async def _session_token(self, request: Request, audit: AuditContext) -> Response:
        service = self._service
        caller = audit.caller = await self.authenticate(request)
        await self.check_limits("session_token", caller)
        payload = await read_json_object(
            request,
            self._policy.max_body_bytes,
            allow_empty=True,
            timeout_seconds=self._policy.body_timeout_seconds,
        )
        body = encode_forwarded(self._token_body.validate(payload))
        async with service.upstream_gate.slot():
            answer = await service.cynopsis.get_session_token(
                body, request_id_of(request.scope), caller_secrets=presented_credentials(request.headers)
            )
        audit.upstream_status = answer.status
        reduced, dropped = self._token_answer.reduce(answer.payload)
        token = reduced.get("session_token")
        if token is None:
            raise UpstreamMalformed(
                "The liveness service returned no usable session token.", upstream_status=answer.status
            )
        if dropped:
            reduced["redacted_fields"] = dropped
        encoded = encode_upstream(reduced, answer.status)
        # Durable before the caller holds the token: a token the proxy does not know never works.
        if not await service.session_tokens.bind(token, caller.commitment, reduced.get("expires_in")):
            # Cynopsis handed out a token it had issued before (to this caller or another): passing
            # it on could give one user's attempt to another.
            raise UpstreamMalformed(
                "The liveness service returned a session token it had already issued.",
                upstream_status=answer.status,
            )
        return json_response(encoded)

    async def _create_session(self, request: Request, audit: AuditContext) -> Response:
        service = self._service
        caller = audit.caller = await self.authenticate(request)
        # Every authenticated request counts, a malformed one (400) too.
        await self.check_limits("create_session", caller)
        key = idempotency_key_of(request.headers)
        payload = await read_json_object(
            request,
            self._policy.max_body_bytes,
            allow_empty=False,
            timeout_seconds=self._policy.body_timeout_seconds,
        )
        forwarded = self._create_body.validate(payload)

        async def create(goes_out: CallGoesOut) -> Response:
            return await self._create(request, audit, caller, forwarded, goes_out)

        if key is None:
            return await create(CallGoesOut())
        response = await self._idempotent.run(
            service.hashes.subject(caller.commitment), key, forwarded, request_id_of(request.scope), create
        )
        if response.headers.get("idempotent-replayed") == "true":
            # Its own action, so the audit log never counts a replay as a second session.
            audit.action = "session.replay"
            audit.session_id = replayed_session_id(response)
        return response

    async def _create(
        self,
        request: Request,
        audit: AuditContext,
        caller: Caller,
        forwarded: dict[str, object],
        goes_out: CallGoesOut,
    ) -> Response:
        service = self._service
        body = encode_forwarded(forwarded)
        session_token = str(forwarded["session_token"])
        request_id = request_id_of(request.scope)
        async with service.upstream_gate.slot():
            # The session token is used and an attempt counted only right before the call goes out
            # (a slot, the circuit breaker's admission and an access token in hand): an outage of
            # ours costs neither. An attempt that fails upstream still counts (the cap bounds brute
            # force, it is not a bill); only a token Cynopsis never acted on is given back.
            await service.tokens.get()
            taken: list[TakenToken] = []

            async def before_sending() -> None:
                token = await service.session_tokens.take(session_token, caller.commitment)
                try:
                    await service.limits.consume_attempt(caller.commitment)
                except BaseException:
                    await token.put_back()  # refused before the call: the token stays usable
                    raise
                taken.append(token)
                goes_out()

            try:
                answer = await service.cynopsis.create_session(
                    body,
                    request_id,
                    before_sending=before_sending,
                    caller_secrets=presented_credentials(request.headers),
                )
            except UpstreamError as error:
                if error.not_processed and taken:
                    # Never sent, or refused unprocessed (401, 429): the token is unspent upstream,
                    # so it stays usable here too, and the answer is not one to replay.
                    goes_out.withdraw()
                    await taken[0].put_back()
                raise
        audit.upstream_status = answer.status
        session_id = session_id_from(answer.payload, self._policy.session_id_fields, answer.status)
        audit.session_id = session_id
        reduced, dropped = self._session_answer.reduce(answer.payload)
        shaped = {"session_id": session_id, **without_id_fields(reduced, self._policy.session_id_fields)}
        if dropped:
            shaped["redacted_fields"] = dropped
        # Encoded before binding: once the binding is committed, nothing may fail on the way to
        # the caller.
        encoded = encode_upstream(shaped, answer.status)
        owner = SessionOwner(
            session_id=session_id,
            subject=caller.subject,
            credential_id=caller.credential_id,
            created_at=service.wall_clock(),
            request_id=request_id,
            reference=caller.reference,
            subject_commitment=caller.commitment,
        )
        try:
            await service.ownership.bind(owner, request_id)
        except SessionAlreadyBound:
            raise UpstreamMalformed(
                "The liveness service returned a session id that is already in use.",
                upstream_status=answer.status,
            ) from None
        # The binding is durable before its audit record (written by the audit policy), and both
        # before the caller sees the id: a crash in between leaves a binding nobody was told of,
        # never an unaudited answer.
        location = session_result_location(request.scope.get("root_path", ""), session_id)
        return json_response(encoded, status=201, headers={"Location": location})

    async def _result(self, request: Request, audit: AuditContext) -> Response:
        service = self._service
        caller = audit.caller = await self.authenticate(request)
        # Every authenticated request counts, one with a malformed session id (400) too.
        await self.check_limits("result", caller)
        session_id = valid_session_id(request)
        audit.session_id = session_id
        owner = await service.ownership.owner_of(session_id)
        # A foreign session and an unknown one are indistinguishable to the caller, on purpose.
        if owner is None or (owner.subject != caller.subject and not caller.is_admin):
            raise NotFound("No such liveness session.")
        # Only now, past the ownership check, may the read share another caller's answer.
        return await self._result_reads.read(
            owner, request_id_of(request.scope), presented_credentials(request.headers), audit
        )

    async def authenticate(self, request: Request) -> Caller:
        """Who calls, in a span of its own (it may wait on the database or the JWKS); see
        `_authenticate_caller`."""
        if self._service.tracing.tracer is None:
            return await self._authenticate_caller(request)  # off: not even a no-op span
        with self._service.tracing.span("authenticate") as span:
            caller = await self._authenticate_caller(request)
            if span is not None:
                # How, and the subject's commitment: never the subject, the key or the token.
                kind = caller.credential_id.partition(":")[0]
                # A closed set: a host's own credential id (library mode) may be anything, an e-mail too.
                span.set_attribute(
                    "liveness_proxy.credential.kind", kind if kind in ("key", "jwt") else "host"
                )
                span.set_attribute("liveness_proxy.subject_commitment", caller.commitment)
            return caller

    async def check_limits(self, name: LimitName, caller: Caller) -> None:
        """The caller's rate limit and daily cap for `name`, in a span of its own (Redis may be slow)."""
        if self._service.tracing.tracer is None:
            await self._service.limits.check(name, caller.commitment)
            return
        with self._service.tracing.span("limits", attributes=_LIMIT_ATTRIBUTES[name]):
            await self._service.limits.check(name, caller.commitment)

    async def _authenticate_caller(self, request: Request) -> Caller:
        """Who calls (the admin routes authenticate through here too): the host's hook first in
        library mode, then the proxy's API keys and JWTs. A failure counts against the client
        address's unauthenticated limit; an address over it is refused before any of this work,
        unless it presents an API key this process has verified before."""
        service = self._service
        gate = service.address_gate
        # The address is worked out only while some address is blocked, or after a failure: an
        # authenticated request from an unblocked address pays nothing for the gate.
        if gate.blocking:
            refusal = gate.refusal(client_address(request.scope))
            if refusal is not None:
                caller = await self._known_despite_refusal(request)
                if caller is None:
                    gate.refused()
                    raise refusal
                return await self._committed(request, caller)
        try:
            caller = await self._authenticate(request)
        except Unauthenticated:
            await gate.failed(client_address(request.scope))
            raise
        return await self._committed(request, caller)

    async def _committed(self, request: Request, caller: Caller) -> Caller:
        """The caller with its subject's commitment, which everything after authentication keys on
        (limits, bindings, the audit record, the access log): never the subject itself."""
        secret = self._service.subjects.cached(caller.subject) or await self._service.subjects.resolve(
            caller.subject
        )
        caller = dataclasses.replace(caller, commitment=secret.commitment)
        request.scope["state"]["subject_commitment"] = secret.commitment
        return caller

    async def _known_despite_refusal(self, request: Request) -> Caller | None:
        """The caller of an API key this process has verified before, from an address over the
        unauthenticated limit (so that an attacker behind a shared NAT does not lock out the
        backends behind it); None for anything else, which is then refused uncounted. In library
        mode nothing is exempt: the host's own authentication must speak first, and it is not
        run for a blocked address."""
        if self._host_authentication is not None:
            return None
        try:
            refuse_repeated_credentials(request.headers)
            return await self._service.authentication.known_caller(request.headers)
        except Unauthenticated:
            return None

    async def _authenticate(self, request: Request) -> Caller:
        if self._host_authentication is not None:
            # Library mode: the host application's own authentication speaks first, but never to a
            # request that carries a credential header twice (the proxy's own check, below, too).
            refuse_repeated_credentials(request.headers)
            caller = await self._host_authentication.authenticate(request)
            if caller is not None:
                return caller
        return await self._service.authentication.authenticate(request.headers)


def valid_session_id(request: Request) -> str:
    session_id = request.path_params["session_id"]
    if not is_session_id(session_id):
        raise BadRequest(f"The session id must be {SESSION_ID_RULE}.")
    return session_id


def replayed_session_id(response: Response) -> str | None:
    """The session id of a replayed 201, for its audit record (a replayed problem has none)."""
    if response.status_code != 201:
        return None
    session_id = orjson.loads(response.body).get("session_id")
    return session_id if is_session_id(session_id) else None


def presented_credentials(headers: Headers) -> tuple[str, ...]:
    """The credential values the caller sent: no upstream answer may hold one (the upstream never
    receives them, so one in an answer means a body carried it there)."""
    values = []
    authorization = headers.get("authorization")
    if authorization is not None:
        values.append(authorization.partition(" ")[2].strip() or authorization)
    api_key = headers.get("x-api-key")
    if api_key is not None:
        values.append(api_key)
    return tuple(values)

"""Idempotent creates: `Idempotency-Key` on `POST /v1/liveness/sessions`.

The first request with a key claims it (`store/idempotency.py`). Its answer is stored once the
Cynopsis call went out, a success or an upstream error alike, and any repeat with the same key and
body gets that answer again, marked `Idempotent-Replayed: true`, without a Cynopsis call or an
attempt. A refusal before the call (a limit, validation, an invalid token, 503) is not stored: the
key is released, so a retry after it is a fresh request. A repeat while the first is in flight
gets 409 with Retry-After; the same key with another body gets 422.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from starlette.datastructures import Headers
from starlette.responses import Response

from liveness_proxy.api.responses import RawHeadersResponse, problem_response
from liveness_proxy.errors import (
    BadRequest,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    ProblemError,
)
from liveness_proxy.store.idempotency import (
    Claimed,
    IdempotencyRecords,
    InFlight,
    Replay,
    Reused,
    StoredAnswer,
)

IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
REPLAYED_HEADER = (b"idempotent-replayed", b"true")
PROBLEM_MEDIA_TYPE = "application/problem+json"


def idempotency_key_of(headers: Headers) -> str | None:
    values = headers.getlist("idempotency-key")
    if not values:
        return None
    if len(values) > 1 or IDEMPOTENCY_KEY.fullmatch(values[0]) is None:
        raise BadRequest("The Idempotency-Key header must be given once, as 1-64 characters of A-Za-z0-9_-.")
    return values[0]


def canonical(forwarded: dict[str, Any]) -> bytes:
    """The request as it would go upstream, canonically: two bodies that differ only in member order
    or whitespace are the same request."""
    return orjson.dumps(forwarded, option=orjson.OPT_SORT_KEYS)


@dataclass(slots=True)
class CallGoesOut:
    """Set by the create right before its Cynopsis call is sent: from then on its answer is stored."""

    sent: bool = False

    def __call__(self) -> None:
        self.sent = True

    def withdraw(self) -> None:
        """The call failed before Cynopsis acted on it (never sent, or refused unprocessed): its
        answer is not stored, so a retry with the key is a fresh request."""
        self.sent = False


Create = Callable[[CallGoesOut], Awaitable[Response]]


class IdempotentCreates:
    def __init__(
        self,
        records: IdempotencyRecords,
        *,
        fingerprint: Callable[[bytes], str],
        ttl_seconds: float,
        lease_seconds: float,
        wall_clock: Callable[[], float],
        logger: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """`fingerprint`: a keyed hash of a canonical request body. `lease_seconds`: longer than any
        create can take (gate wait, access tokens, the call and its one retry, the store writes), so
        a live request never loses its key."""
        self._records = records
        self._fingerprint = fingerprint
        self._logger = logger
        self._ttl_seconds = ttl_seconds
        self._lease_seconds = lease_seconds
        self._wall_clock = wall_clock

    async def run(
        self, subject_hash: str, key: str, forwarded: dict[str, Any], request_id: str, create: Create
    ) -> Response:
        fingerprint = self._fingerprint(canonical(forwarded))
        begun = await self._records.begin(
            subject_hash,
            key,
            fingerprint,
            now=self._wall_clock(),
            lease_seconds=self._lease_seconds,
            ttl_seconds=self._ttl_seconds,
        )
        if isinstance(begun, Replay):
            return replayed(begun.answer, request_id)
        if isinstance(begun, Reused):
            raise IdempotencyKeyReused()
        if isinstance(begun, InFlight):
            # The first request usually ends within a second; its lease bounds the wait if it died.
            raise IdempotencyKeyInFlight(retry_after_seconds=1)
        if not isinstance(begun, Claimed):  # the four outcomes are exhaustive; a new one is a bug
            raise TypeError(f"unexpected idempotency outcome {type(begun).__name__}")
        goes_out = CallGoesOut()
        try:
            response = await create(goes_out)
        except ProblemError as error:
            if goes_out.sent:
                answer = problem_response(error, request_id)
                await self._complete(subject_hash, key, begun.owner, fingerprint, answer, None)
            else:
                await self._records.abandon(subject_hash, key, begun.owner)
            raise
        except BaseException:
            # A bug or an outage of ours. Before the call: the key is free again. After it: the
            # record stays in flight until its lease lapses (the session token is spent, so a
            # retry then gets `session-token-invalid`, never a second session).
            if not goes_out.sent:
                await self._records.abandon(subject_hash, key, begun.owner)
            raise
        await self._complete(
            subject_hash, key, begun.owner, fingerprint, response, response.headers.get("location")
        )
        return response

    async def _complete(
        self,
        subject_hash: str,
        key: str,
        owner: str,
        fingerprint: str,
        response: Response,
        location: str | None,
    ) -> None:
        answer = StoredAnswer(
            status=response.status_code,
            content_type=response.headers.get("content-type", "application/json"),
            body=bytes(response.body),
            location=location,
        )
        stored = await self._records.complete(
            subject_hash,
            key,
            owner,
            fingerprint,
            answer,
            now=self._wall_clock(),
            ttl_seconds=self._ttl_seconds,
        )
        if not stored:
            # Another request took the key over after this one's lease lapsed: its answer stands.
            self._logger.warning("idempotency_answer_not_stored", status=answer.status)


def replayed(answer: StoredAnswer, request_id: str) -> Response:
    body = answer.body
    if answer.content_type.startswith(PROBLEM_MEDIA_TYPE):
        # A problem names its request: this one, so the body and X-Request-ID still agree.
        problem = orjson.loads(body)
        problem["request_id"] = request_id
        body = orjson.dumps(problem)
    headers = [
        (b"content-type", answer.content_type.encode("latin-1")),
        (b"cache-control", b"no-store"),
        REPLAYED_HEADER,
    ]
    if answer.location is not None:
        headers.append((b"location", answer.location.encode("latin-1")))
    return RawHeadersResponse(body, answer.status, headers)

"""One webhook attempt: sign, POST, and classify the answer.

Only a 2xx answer is a delivery. No redirect is followed (the transport follows none): a 3xx is a
failure like any other. `410 Gone` means the receiver removed the endpoint: the worker disables it
until an operator re-enables it. `Retry-After` on 429 and 503 says when to try again.

With tracing on, each attempt is a CLIENT span `POST` (a child of the delivery's span), and the
receiver gets that span's `traceparent`, never a tracestate. The span names the receiver's host,
port and scheme only: its path or query may hold a token of the receiver's (some URLs are the
secret), so `url.full` and `url.path` are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from opentelemetry.trace import SpanKind

from liveness_proxy.http import USER_AGENT, HttpError, HttpResponse, HttpTransport, Url
from liveness_proxy.http.retry_after import parse_retry_after
from liveness_proxy.tracing import Tracing, client_attributes, mark_failed, record_answer
from liveness_proxy.webhook_signing import webhook_headers

_MAX_ANSWER_BYTES = 64 * 1024  # the receiver's body is read only to be dropped

Verdict = Literal["delivered", "gone", "failed"]


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    verdict: Verdict
    status: int | None  # the receiver's HTTP status; None when no answer came
    error: str | None  # log-safe: a status or an error class, never a URL, a header or a body
    retry_after: float | None = None  # seconds, from Retry-After on 429/503


class WebhookSender:
    def __init__(
        self,
        transport: HttpTransport,
        url: str,
        *,
        keys: Sequence[bytes],
        timeout_seconds: float,
        wall_clock: Callable[[], float],
        tracing: Tracing | None = None,
    ) -> None:
        """`tracing`: the app's (None: off)."""
        self._transport = transport
        self._url = Url.parse(url)
        self._keys = tuple(keys)
        self._timeout_seconds = timeout_seconds
        self._wall_clock = wall_clock
        self._tracing = tracing if tracing is not None else Tracing.off()
        self._span_attributes = client_attributes("POST", self._url.origin)

    async def attempt(self, event_id: str, body: bytes) -> AttemptOutcome:
        """Sends `body` once, signed with this moment's timestamp."""
        with self._tracing.span("POST", kind=SpanKind.CLIENT, attributes=self._span_attributes) as span:
            headers = [
                ("content-type", "application/json"),
                ("user-agent", USER_AGENT),
                *webhook_headers(self._keys, event_id, int(self._wall_clock()), body).items(),
                *self._tracing.outbound_headers(),  # inside the span: it names this attempt
            ]
            try:
                response = await self._transport.request(
                    "POST",
                    self._url,
                    headers=headers,
                    body=body,
                    max_body_bytes=_MAX_ANSWER_BYTES,
                    timeout_seconds=self._timeout_seconds,
                )
            except HttpError as exc:
                if span is not None:
                    mark_failed(span, exc)
                return AttemptOutcome("failed", None, f"no answer: {type(exc).__name__}")
            record_answer(span, response.status)
        return self._outcome(response)

    def _outcome(self, response: HttpResponse) -> AttemptOutcome:
        status = response.status
        if 200 <= status < 300:
            return AttemptOutcome("delivered", status, None)
        if status == 410:
            return AttemptOutcome("gone", status, "HTTP 410 Gone: endpoint disabled")
        retry_after = None
        header = response.header(b"retry-after")
        if status in (429, 503) and header is not None:
            retry_after = float(parse_retry_after(header, now=self._wall_clock()))
        return AttemptOutcome("failed", status, f"HTTP {status}", retry_after)

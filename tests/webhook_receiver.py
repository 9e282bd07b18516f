"""A customer's backend for the tests: a real HTTP server that receives webhooks, verifies each with
the official `standardwebhooks` package (the independent judge of our signatures, not our code),
and answers what the test scripted."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
import standardwebhooks
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from liveness_proxy.webhook_signing import new_webhook_secret
from support import ServerThread


@dataclass(frozen=True)
class Delivery:
    webhook_id: str
    timestamp: int
    signature: str
    body: dict[str, Any]
    verified: bool
    answered: int
    received_at: float
    headers: dict[str, str] = field(default_factory=dict)  # every header as received, lower-cased


@dataclass
class WebhookReceiver:
    """Answers 200 unless `script` holds statuses (or (status, headers)) to answer first, in order."""

    secret: str = field(default_factory=new_webhook_secret)
    deliveries: list[Delivery] = field(default_factory=list)
    script: deque[int | tuple[int, dict[str, str]]] = field(default_factory=deque)
    always: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ServerThread | None = None

    def __enter__(self) -> WebhookReceiver:
        app = Starlette(routes=[Route("/hooks/liveness", self._receive, methods=["POST"])])
        self._server = ServerThread(app, lifespan="off").start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"{self._server.url}/hooks/liveness"

    def settings(self, **extra: Any) -> dict[str, Any]:
        return {"LIVENESS_PROXY_WEBHOOK_URL": self.url, "LIVENESS_PROXY_WEBHOOK_SECRET": self.secret, **extra}

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        try:
            standardwebhooks.Webhook(self.secret).verify(body, dict(request.headers))
            verified = True
        except standardwebhooks.WebhookVerificationError:
            verified = False
        with self._lock:
            answer: int | tuple[int, dict[str, str]] = (
                self.script.popleft() if self.script else (self.always if self.always is not None else 200)
            )
            status, headers = answer if isinstance(answer, tuple) else (answer, {})
            self.deliveries.append(
                Delivery(
                    webhook_id=request.headers.get("webhook-id", ""),
                    timestamp=int(request.headers.get("webhook-timestamp", "0")),
                    signature=request.headers.get("webhook-signature", ""),
                    body=orjson.loads(body),
                    verified=verified,
                    answered=status,
                    received_at=time.monotonic(),
                    headers=dict(request.headers),
                )
            )
        return Response(status_code=status, headers=headers)

    def accepted(self) -> list[Delivery]:
        """Deliveries answered 2xx, deduplicated by webhook-id as a receiver must."""
        seen: dict[str, Delivery] = {}
        with self._lock:
            for delivery in self.deliveries:
                if 200 <= delivery.answered < 300:
                    seen.setdefault(delivery.webhook_id, delivery)
        return list(seen.values())

    def wait_for(self, count: int, *, timeout: float = 15.0, accepted: bool = True) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.accepted() if accepted else list(self.deliveries)
            if len(got) >= count:
                return got
            assert time.monotonic() < deadline, f"{len(got)} of {count} webhooks arrived: {self.deliveries}"
            time.sleep(0.02)

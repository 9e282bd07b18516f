"""The customer's backend, played by the demo: it receives the proxy's webhooks and checks each one
as a receiver must (Standard Webhooks, `spec/standard-webhooks.md`), so the page can show a verdict
arriving with its signature checked, even for a session whose page was closed before the verdict.

A delivery is accepted only when
- `webhook-id`, `webhook-timestamp` and `webhook-signature` are all there;
- the timestamp is within `TOLERANCE_SECONDS` of this clock (an old delivery captured on the wire
  cannot be replayed later);
- one of the `v1,` signatures equals HMAC-SHA256 over `{id}.{timestamp}.{body}` with one of the
  configured keys, compared in constant time.

Anything else is refused (400) and not listed: the route is reachable by anything that can reach
the demo, so a forged event must not show up on the page as a verdict. A delivery whose id was seen
before (a retry whose 2xx answer was lost) is acknowledged again but listed once.

Standard library only: the `standardwebhooks` package is a test dependency, the judge of the
proxy's signatures, not something the demo may need at run time.
"""

from __future__ import annotations

import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from liveness_proxy.errors import BadRequest
from liveness_proxy.webhook_signing import parse_webhook_secrets, webhook_signature

# The Standard Webhooks recommendation, and what its reference libraries use.
TOLERANCE_SECONDS = 300
KEPT_EVENTS = 50
# Ids remembered for deduplication: far more than a demo's sessions, bounded all the same.
REMEMBERED_IDS = 1000
SIGNATURE_VERSION = "v1,"
# What a webhook id may be here: printable ASCII without spaces (the proxy's are `msg_` + hex).
_WEBHOOK_ID = re.compile(r"[\x21-\x7e]{1,256}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


class WebhookRefused(BadRequest):
    """A delivery that is not from the proxy, or not now: answered 400, never listed."""


@dataclass(frozen=True, slots=True)
class VerifiedDelivery:
    webhook_id: str
    timestamp: int


class WebhookVerifier:
    """Checks one delivery against the configured `whsec_` secret(s) (space-separated, as the proxy's
    LIVENESS_PROXY_WEBHOOK_SECRET; any of them may have signed it)."""

    def __init__(
        self,
        webhook_secret: str,
        *,
        tolerance_seconds: float = TOLERANCE_SECONDS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = parse_webhook_secrets(webhook_secret)
        self._tolerance_seconds = tolerance_seconds
        self._wall_clock = wall_clock

    def verify(self, headers: Mapping[str, str], body: bytes) -> VerifiedDelivery:
        """The delivery's id and timestamp; WebhookRefused (naming what failed, never a value)."""
        webhook_id = headers.get("webhook-id", "")
        timestamp_text = headers.get("webhook-timestamp", "").strip()
        signatures = headers.get("webhook-signature", "")
        if not webhook_id or not timestamp_text or not signatures:
            raise WebhookRefused("A webhook needs webhook-id, webhook-timestamp and webhook-signature.")
        if not _WEBHOOK_ID.fullmatch(webhook_id):
            raise WebhookRefused("The webhook-id is not an id.")
        if not _TIMESTAMP.fullmatch(timestamp_text):
            raise WebhookRefused("The webhook-timestamp is not a Unix time in seconds.")
        timestamp = int(timestamp_text)
        if abs(self._wall_clock() - timestamp) > self._tolerance_seconds:
            # Checked before the signature: a replayed old delivery carries a valid one.
            raise WebhookRefused(
                f"The webhook-timestamp is more than {int(self._tolerance_seconds)} s from now."
            )
        expected = webhook_signature(self._keys, webhook_id, timestamp, body).split()
        offered = [item for item in signatures.split() if item.startswith(SIGNATURE_VERSION)]
        # Every pair is compared, match or not: how long this takes says nothing about the keys.
        matches = [
            hmac.compare_digest(mine.encode(), theirs.encode()) for mine in expected for theirs in offered
        ]
        if not any(matches):
            raise WebhookRefused("No webhook-signature matches: this did not come from the proxy.")
        return VerifiedDelivery(webhook_id, timestamp)


@dataclass(frozen=True, slots=True)
class ReceivedWebhook:
    """One verified event as the page lists it (its body's fields that a backend would act on)."""

    sequence: int
    webhook_id: str
    type: str
    session_id: str | None
    status: str | None
    confidence: float | None
    passed: bool | None
    signed_at: int
    received_at: float

    def as_json(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "webhook_id": self.webhook_id,
            "type": self.type,
            "session_id": self.session_id,
            "status": self.status,
            "confidence": self.confidence,
            "passed": self.passed,
            "signed_at": self.signed_at,
            "received_at": self.received_at,
            # Only verified deliveries are kept: the page says so next to each one.
            "signature_verified": True,
        }


class WebhookInbox:
    """The last `capacity` verified events, in memory (a demo run's worth), and counts of what was
    refused or came twice. Read by the page's polls, written by deliveries."""

    def __init__(self, *, capacity: int = KEPT_EVENTS, remembered_ids: int = REMEMBERED_IDS) -> None:
        self._events: deque[ReceivedWebhook] = deque(maxlen=capacity)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remembered_ids = remembered_ids
        self._sequence = 0
        self.refused = 0
        self.duplicates = 0
        # Names this run's sequence: a page still open across a restart starts its list again.
        self.run_id = secrets.token_hex(8)
        # Handlers run on one event loop, but a test may read from another thread.
        self._lock = threading.Lock()

    def accept(
        self, delivery: VerifiedDelivery, body: bytes, *, received_at: float
    ) -> ReceivedWebhook | None:
        """Lists a verified delivery; None when its id was seen before. WebhookRefused when the body
        is not a JSON object with a `type` (the signature was valid, so the proxy sent it: a bug
        there, which a 400 makes visible in its delivery log)."""
        try:
            event = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise WebhookRefused("The webhook body is not JSON.") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise WebhookRefused("The webhook body is not an event (a JSON object with a type).")
        raw_data = event.get("data")
        data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
        with self._lock:
            if delivery.webhook_id in self._seen:
                self.duplicates += 1
                return None
            self._seen[delivery.webhook_id] = None
            if len(self._seen) > self._remembered_ids:
                self._seen.popitem(last=False)
            self._sequence += 1
            received = ReceivedWebhook(
                sequence=self._sequence,
                webhook_id=delivery.webhook_id,
                type=event["type"],
                session_id=_text(data.get("session_id")),
                status=_text(data.get("status")),
                confidence=_number(data.get("confidence")),
                passed=data.get("passed") if isinstance(data.get("passed"), bool) else None,
                signed_at=delivery.timestamp,
                received_at=received_at,
            )
            self._events.append(received)
            return received

    def count_refused(self) -> None:
        with self._lock:
            self.refused += 1

    def since(self, after: int) -> tuple[list[ReceivedWebhook], int]:
        """The kept events after sequence `after`, oldest first, and the sequence to ask after next."""
        with self._lock:
            return [event for event in self._events if event.sequence > after], self._sequence


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)

"""The `webhooks` section of the OpenAPI document: what the proxy POSTs to LIVENESS_PROXY_WEBHOOK_URL,
one entry per event type, with the three Standard Webhooks headers and how each answer is taken.
The body schemas are models in `schemas` (SessionCompletedEvent, ...)."""

from __future__ import annotations

from typing import Any

from liveness_proxy.delivery.events import COMPLETED, EXPIRED, PING_EVENT, UNRESOLVED

# The three Standard Webhooks headers of every delivery attempt (liveness_proxy.webhook_signing).
_WEBHOOK_HEADERS: list[dict[str, Any]] = [
    {
        "name": "webhook-id",
        "in": "header",
        "required": True,
        "description": "The event's id: the same on every attempt of one event. Deliveries are at "
        "least once: deduplicate on it.",
        "schema": {"type": "string", "pattern": "^msg_[0-9a-f]{30}$"},
    },
    {
        "name": "webhook-timestamp",
        "in": "header",
        "required": True,
        "description": "Unix time (seconds) at which this attempt was signed; each attempt is signed "
        "afresh. Refuse one too far from your clock (the Standard Webhooks libraries allow 5 minutes).",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    {
        "name": "webhook-signature",
        "in": "header",
        "required": True,
        "description": "`v1,` and the base64 HMAC-SHA256, keyed with the bytes of the `whsec_` secret "
        "(LIVENESS_PROXY_WEBHOOK_SECRET), of `{webhook-id}.{webhook-timestamp}.{raw body}`. One "
        "signature per configured secret, separated by spaces (two during a rotation): accept the "
        "event when any one verifies. Any Standard Webhooks library verifies it.",
        "schema": {"type": "string", "pattern": "^v1,[A-Za-z0-9+/]+={0,2}( v1,[A-Za-z0-9+/]+={0,2})*$"},
    },
]

# Event type, the operationId of its entry, and the schema of its body.
_WEBHOOK_EVENTS = (
    (COMPLETED, "sessionCompletedWebhook", "SessionCompletedEvent"),
    (EXPIRED, "sessionExpiredWebhook", "SessionExpiredEvent"),
    (UNRESOLVED, "sessionUnresolvedWebhook", "SessionUnresolvedEvent"),
    (PING_EVENT, "pingWebhook", "PingEvent"),
)


def webhooks_section() -> dict[str, Any]:
    """What the proxy POSTs to LIVENESS_PROXY_WEBHOOK_URL: one entry per event type."""
    answers = {
        "2XX": {"description": "Delivered: the event is not sent again."},
        "410": {
            "description": "Gone: the endpoint is disabled until an operator re-enables it; events "
            "wait queued meanwhile, none is lost."
        },
        "429": {"description": "Retried later: after Retry-After when given, else on the retry schedule."},
        "503": {"description": "Retried later: after Retry-After when given, else on the retry schedule."},
        "default": {
            "description": "Any other answer, a redirect (never followed) or none within "
            "LIVENESS_PROXY_WEBHOOK_TIMEOUT_SECONDS: retried under the same webhook-id on "
            "LIVENESS_PROXY_WEBHOOK_RETRY_SCHEDULE, then dead-lettered."
        },
    }
    return {
        event_type: {
            "post": {
                "operationId": operation_id,
                "summary": f"`{event_type}`, signed by the Standard Webhooks scheme.",
                "parameters": _WEBHOOK_HEADERS,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
                },
                "responses": answers,
            }
        }
        for event_type, operation_id, schema in _WEBHOOK_EVENTS
    }

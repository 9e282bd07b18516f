"""Webhooks to the customer's backend (Standard Webhooks): the event bodies and one signed attempt.

    events.py   the event types and their thin JSON bodies (never images, tokens or upstream text)
    sender.py   `WebhookSender`: signs and sends one attempt, and says what the answer means

The outbox rows and their delivery jobs are in store/ (outbox.py, jobs.py); the worker that drives
them is background/.
"""

from liveness_proxy.delivery.events import (
    EVENT_TYPES,
    PING_EVENT,
    VerdictEvents,
    new_event_id,
)
from liveness_proxy.delivery.sender import AttemptOutcome, WebhookSender

__all__ = ["EVENT_TYPES", "PING_EVENT", "AttemptOutcome", "VerdictEvents", "WebhookSender", "new_event_id"]

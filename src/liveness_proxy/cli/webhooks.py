"""`webhooks secret | test | list | resend | enable`: the webhook endpoint and its events.

`secret` and `test` need no database. `list`, `resend` and `enable` work on the outbox without
migrating, like the audit commands, so they are safe beside running proxies of this version: a
resend or an enable is picked up by their background workers at their next poll.

Nothing here prints the signing secret (except `secret`, whose one job is to make one) or a
signature: the answer of a test is its status and the sender's log-safe verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from liveness_proxy.cli import EXIT_FAILURE
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.settings import Settings
from liveness_proxy.webhook_signing import new_webhook_secret, parse_webhook_secrets

if TYPE_CHECKING:  # the database and HTTP layers are imported by the commands that use them
    from liveness_proxy.delivery import AttemptOutcome
    from liveness_proxy.store import StoredEvent

# The job states of store/jobs.py as an operator reads them: a `deliver` job is done once delivered.
_STATE_NAMES = {"done": "delivered", "queued": "queued", "dead": "dead"}
_ENABLE_HINT = "`liveness-proxy webhooks enable`"


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shown_endpoint(url: str) -> str:
    """The endpoint without its query, which may carry a token of the receiver's."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"


# -- secret -----------------------------------------------------------------------------------------


def cmd_webhooks_secret(_args: argparse.Namespace) -> int:
    """Only the secret on stdout, so `... webhooks secret > file` is all a script needs."""
    print(new_webhook_secret())
    return 0


# -- test -------------------------------------------------------------------------------------------


def cmd_webhooks_test(_args: argparse.Namespace) -> int:
    settings = Settings.load()
    url = settings.liveness_proxy_webhook_url
    if not url:
        raise ConfigurationError("LIVENESS_PROXY_WEBHOOK_URL: required by `webhooks test` (where to send)")
    settings.require_webhook_secret()
    event_id, outcome = asyncio.run(_send_ping(settings))
    print(f"sent liveness.ping {event_id} to {_shown_endpoint(url)}")
    answer = "none" if outcome.status is None else f"HTTP {outcome.status}"
    error = "" if outcome.error is None else f"; error: {outcome.error}"
    print(f"answer: {answer}; verdict: {outcome.verdict}{error}")
    if outcome.verdict == "gone":
        print(
            f"a delivery answered 410 disables the endpoint until {_ENABLE_HINT}: "
            "fix the receiver's URL first",
            file=sys.stderr,
        )
    return 0 if outcome.verdict == "delivered" else EXIT_FAILURE


async def _send_ping(settings: Settings) -> tuple[str, AttemptOutcome]:
    """One signed `liveness.ping`, sent the way deliveries are (same sender, same headers)."""
    from liveness_proxy.delivery import PING_EVENT, WebhookSender, new_event_id
    from liveness_proxy.delivery.events import event_body
    from liveness_proxy.http import Http1Transport

    timeout = settings.liveness_proxy_webhook_timeout_seconds
    event_id = new_event_id()
    body = event_body(PING_EVENT, time.time(), {})
    async with Http1Transport(max_connections=1, connect_timeout_seconds=min(timeout, 10.0)) as http:
        sender = WebhookSender(
            http,
            settings.liveness_proxy_webhook_url,
            keys=parse_webhook_secrets(settings.liveness_proxy_webhook_secret.get_secret_value()),
            timeout_seconds=timeout,
            wall_clock=time.time,
        )
        return event_id, await sender.attempt(event_id, body)


# -- list -------------------------------------------------------------------------------------------


def cmd_webhooks_list(args: argparse.Namespace) -> int:
    settings = Settings.load()

    async def run() -> tuple[list[StoredEvent], float | None]:
        from liveness_proxy.cli.audit import current_schema_database
        from liveness_proxy.store import WebhookOutbox

        async with current_schema_database(settings) as engine:
            outbox = WebhookOutbox(engine)
            events = await outbox.events(failed_only=args.failed, session_id=args.session, limit=args.limit)
            return events, await outbox.endpoint_disabled_at()

    events, disabled_at = asyncio.run(run())
    if args.json:
        document = {
            "endpoint": {"disabled": disabled_at is not None, "disabled_at": _iso(disabled_at)},
            "events": [_event_fields(event) for event in events],
        }
        print(orjson.dumps(document).decode())
    else:
        _print_table(events, disabled_at, failed_only=args.failed)
    if len(events) == args.limit:
        print(f"showing the newest {args.limit} events; --limit to see more", file=sys.stderr)
    return 0


def _event_fields(event: StoredEvent) -> dict[str, Any]:
    state = _STATE_NAMES.get(event.state, event.state)
    return {
        "event_id": event.event_id,
        "type": event.type,
        "session_id": event.session_id,
        "state": state,
        "attempts": event.attempts,
        "last_status": event.last_status,
        "last_error": event.last_error,
        "created_at": _iso(event.created_at),
        "delivered_at": _iso(event.delivered_at),
        "next_attempt_at": _iso(event.due_at) if state == "queued" else None,
    }


def _print_table(events: Sequence[StoredEvent], disabled_at: float | None, *, failed_only: bool) -> None:
    if disabled_at is None:
        print("endpoint: enabled")
    else:
        print(
            f"endpoint: DISABLED since {_iso(disabled_at)} (it answered 410 Gone); "
            f"queued events wait for {_ENABLE_HINT}"
        )
    if not events:
        print("no failed webhook events" if failed_only else "no webhook events")
        return
    headers = ("EVENT ID", "TYPE", "SESSION", "STATE", "ATTEMPTS", "LAST STATUS", "CREATED", "DELIVERED")
    rows = [
        (
            fields["event_id"],
            fields["type"],
            fields["session_id"] or "-",
            fields["state"],
            str(fields["attempts"]),
            "-" if fields["last_status"] is None else str(fields["last_status"]),
            fields["created_at"],
            fields["delivered_at"] or "-",
            fields["last_error"] or "-",
        )
        for fields in map(_event_fields, events)
    ]
    # Padded to the widest value; the last error, of any length, comes last and unpadded.
    widths = [max(len(headers[index]), *(len(row[index]) for row in rows)) for index in range(len(headers))]
    for row in [(*headers, "LAST ERROR"), *rows]:
        print(
            "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=False)) + "  " + row[-1]
        )


# -- resend, enable ---------------------------------------------------------------------------------


def cmd_webhooks_resend(args: argparse.Namespace) -> int:
    settings = Settings.load()

    async def run() -> tuple[StoredEvent | None, bool, float | None]:
        from liveness_proxy.cli.audit import current_schema_database
        from liveness_proxy.store import JobQueue, WebhookOutbox

        async with current_schema_database(settings) as engine:
            outbox = WebhookOutbox(engine)
            event = await outbox.event(args.event_id)
            if event is None or event.body is None:
                return event, False, None
            if not await JobQueue(engine).requeue("deliver", args.event_id, now=time.time()):
                return event, False, None
            return event, True, await outbox.endpoint_disabled_at()

    event, requeued, disabled_at = asyncio.run(run())
    if event is None:
        print(
            f"no webhook event with id {args.event_id!r} (see `liveness-proxy webhooks list`)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if event.body is None:
        print(
            f"{event.event_id} was erased (an erasure or the retention): there is nothing to resend",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if not requeued:
        # A process holds its lease: an attempt is under way, and a second one beside it would race.
        print(
            f"{event.event_id} is being attempted right now; try again when that attempt has ended",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    was = _STATE_NAMES.get(event.state, event.state)
    print(
        f"re-queued {event.event_id} ({event.type}; was {was} after {event.attempts} attempts): "
        "it is sent again under the same webhook-id, with a fresh retry schedule"
    )
    if disabled_at is not None:
        print(
            f"note: the endpoint is disabled since {_iso(disabled_at)} (it answered 410 Gone): "
            f"the event waits until {_ENABLE_HINT}"
        )
    return 0


def cmd_webhooks_enable(_args: argparse.Namespace) -> int:
    settings = Settings.load()

    async def run() -> tuple[float | None, bool, int]:
        from liveness_proxy.cli.audit import current_schema_database
        from liveness_proxy.store import JobQueue, WebhookOutbox

        async with current_schema_database(settings) as engine:
            outbox = WebhookOutbox(engine)
            disabled_at = await outbox.endpoint_disabled_at()
            enabled = await outbox.enable_endpoint()
            waiting = (await JobQueue(engine).counts()).get(("deliver", "queued"), 0)
            return disabled_at, enabled, waiting

    disabled_at, enabled, waiting = asyncio.run(run())
    if not enabled:
        print(f"the webhook endpoint was not disabled; nothing changed ({waiting} events queued)")
        return 0
    since = "" if disabled_at is None else f" (disabled since {_iso(disabled_at)})"
    print(f"re-enabled the webhook endpoint{since}; {waiting} queued events will be delivered")
    return 0

"""The `liveness-proxy` command: serve, sandbox, demo, keys, check, db, audit, subjects, retention,
webhooks.

This module holds only the parser and `main`; each command group is a module of its own (`serve`,
`keys`, `check`, `db`, `audit`, `webhooks`, `sandbox_demo`), imported when its command runs, so a
command loads only what it needs: `sandbox` never the database layer, `keys`, `check`, `audit` and
`webhooks` never the app or uvicorn, `webhooks secret` nothing but the settings.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import re
import sys
from collections.abc import Callable, Sequence

from liveness_proxy.errors import ConfigurationError, StartRefused

EXIT_CONFIGURATION = 2
EXIT_FAILURE = 1


def _command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The handler `name` of `liveness_proxy.cli.<module>`, imported only when the command runs."""

    def handler(args: argparse.Namespace) -> int:
        run: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(f"liveness_proxy.cli.{module}"), name
        )
        return run(args)

    handler.__name__ = handler.__qualname__ = name
    return handler


# -- argument types (the parser needs them before any command module is imported) ------------------

_EPOCH = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _instant(text: str) -> float:
    """An argparse type: ISO 8601 (a time without offset is UTC) or epoch seconds, as epoch seconds."""
    if _EPOCH.fullmatch(text):  # ASCII digits only: float() would also take "nan", "1e9" or "١٢"
        return float(text)
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither ISO 8601 (e.g. 2026-01-31T12:00:00Z) nor epoch seconds"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def _positive_days(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days greater than 0")
    return int(text)


# New keys expire unless the operator says otherwise (`--expires-in never`): a key forgotten in an
# old deployment or a leaked log stops working on its own. Existing keys are not changed.
DEFAULT_KEY_LIFETIME_DAYS = 365
DEFAULT_ROTATION_OVERLAP_DAYS = 7
_MAX_DAYS = 36500  # 100 years: beyond it, "never" says what is meant


def _key_lifetime(text: str) -> int | None:
    """An argparse type: whole days (1-36500), or `never` (None)."""
    if text == "never":
        return None
    if not text.isascii() or not text.isdigit() or not 0 < int(text) <= _MAX_DAYS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a whole number of days from 1 to {_MAX_DAYS} nor 'never'"
        )
    return int(text)


def _overlap_days(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > _MAX_DAYS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number of days from 0 (the old key stops at once) to {_MAX_DAYS}"
        )
    return int(text)


def _positive_count(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number greater than 0")
    return int(text)


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return int(text)


# -- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liveness-proxy",
        description="A security-first backend proxy for the Cynopsis Liveness API.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy from configuration")
    serve.add_argument("--host", default=None, help="bind address (default LIVENESS_PROXY_HOST)")
    serve.add_argument("--port", type=_port, default=None, help="port (default LIVENESS_PROXY_PORT)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument(
        "--ssl-certfile",
        default=None,
        metavar="PEM",
        help="serve HTTPS with this certificate (chain) (default LIVENESS_PROXY_TLS_CERT_FILE)",
    )
    serve.add_argument(
        "--ssl-keyfile",
        default=None,
        metavar="PEM",
        help="the certificate's private key, unencrypted (default LIVENESS_PROXY_TLS_KEY_FILE)",
    )
    serve.set_defaults(handler=_command("serve", "cmd_serve"))

    sandbox = commands.add_parser("sandbox", help="run only the simulated Cynopsis API")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=_port, default=8081)
    sandbox.add_argument("--client-id", default="sandbox-client")
    sandbox.add_argument("--client-secret", default="sandbox-secret")
    sandbox.add_argument("--domain-id", default="sandbox-domain")
    sandbox.add_argument("--control", action="store_true", help="enable the /_sandbox control API")
    sandbox.set_defaults(handler=_command("sandbox_demo", "cmd_sandbox"))

    demo = commands.add_parser("demo", help="sandbox + proxy in one command, with a demo API key")
    demo.add_argument("--dir", default=".liveness-demo", help="folder for the demo database and pepper")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=_port, default=8080)
    demo.add_argument("--sandbox-port", type=_port, default=8081)
    demo.add_argument(
        "--walkthrough-only",
        action="store_true",
        help="run the whole flow once against the started services, print it, and exit",
    )
    demo.set_defaults(handler=_command("sandbox_demo", "cmd_demo"))

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    create = keys.add_parser("create", help="create a key (printed once, last line of stdout)")
    create.add_argument("--subject", required=True, help="the subject sessions are bound to")
    create.add_argument("--scope", action="append", help="a scope, e.g. liveness:admin (repeatable)")
    create.add_argument("--name", default="", help="a label for humans")
    _add_expires_in(create)
    create.add_argument(
        "--json", action="store_true", help='print {"id": ..., "key": ..., "expires_at": ...}'
    )
    create.set_defaults(handler=_command("keys", "cmd_keys_create"))
    listing = keys.add_parser("list", help="list keys (never their secrets), their expiry and last use")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=_command("keys", "cmd_keys_list"))
    revoke = keys.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_command("keys", "cmd_keys_revoke"))
    rotate = keys.add_parser(
        "rotate",
        help="issue a successor (same subject, scopes and name, printed once); the old key expires "
        "after the overlap",
    )
    rotate.add_argument("key_id", metavar="KEY_ID")
    rotate.add_argument(
        "--overlap-days",
        type=_overlap_days,
        default=DEFAULT_ROTATION_OVERLAP_DAYS,
        metavar="N",
        help=f"days the old key keeps working (default {DEFAULT_ROTATION_OVERLAP_DAYS}; 0: it stops at "
        "once); never later than its own expiry",
    )
    _add_expires_in(rotate)
    rotate.add_argument(
        "--json",
        action="store_true",
        help='print {"id", "key", "expires_at", "successor_of", "successor_of_expires_at"}',
    )
    rotate.set_defaults(handler=_command("keys", "cmd_keys_rotate"))

    check = commands.add_parser("check", help="validate configuration and fetch an upstream token")
    check.set_defaults(handler=_command("check", "cmd_check"))

    db = commands.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    upgrade = db.add_parser("upgrade", help="apply migrations")
    upgrade.add_argument(
        "--accept-broken-audit-chain",
        action="store_true",
        help="migration 0008: re-chain an audit chain that does not verify (its damage is recorded in the "
        "audit.rechained event) instead of refusing",
    )
    upgrade.set_defaults(handler=_command("db", "cmd_db_upgrade"))

    audit = commands.add_parser("audit", help="the audit log").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    export = audit.add_parser("export", help="print audit records in chain order, one JSON object a line")
    export.add_argument("--format", choices=["jsonl"], default="jsonl")
    export.add_argument(
        "--since",
        type=_instant,
        default=None,
        help="only records at or after: ISO 8601 (UTC if no offset) or epoch",
    )
    export.add_argument(
        "--until", type=_instant, default=None, help="only records before (exclusive), same forms"
    )
    export.set_defaults(handler=_command("audit", "cmd_audit_export"))
    verify = audit.add_parser("verify", help="check the hash chain; exit 1 naming the first bad record")
    verify.add_argument(
        "--checkpoints",
        default=None,
        metavar="FILE",
        help="also check these signed checkpoints (JSON lines: the checkpoint file, or the JSON log "
        "stream; - for stdin) against the chain",
    )
    verify.add_argument(
        "--public-key",
        action="append",
        default=None,
        metavar="PEMFILE",
        help="an Ed25519 public key the checkpoints may be signed with (repeatable, e.g. the keys "
        "before a rotation); default: the one of LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE",
    )
    verify.set_defaults(handler=_command("audit", "cmd_audit_verify"))
    signing_key = audit.add_parser(
        "signing-key",
        help="write a new Ed25519 key for signing audit checkpoints (mode 0600) and print its public "
        "key for the auditors",
    )
    signing_key.add_argument(
        "--out", required=True, metavar="FILE", help="the private key file (not overwritten)"
    )
    signing_key.set_defaults(handler=_command("audit", "cmd_audit_signing_key"))
    purge = audit.add_parser("purge", help="delete the oldest records; the chain stays verifiable")
    purge.add_argument(
        "--older-than", type=_positive_days, required=True, metavar="DAYS", help="age in whole days (> 0)"
    )
    purge.set_defaults(handler=_command("audit", "cmd_audit_purge"))

    subjects = commands.add_parser("subjects", help="a data subject: erase, export").add_subparsers(
        dest="subjects_command", required=True, metavar="ACTION"
    )
    erase = subjects.add_parser(
        "erase", help="forget a subject: sessions, verdicts, webhook payloads, plain audit values, keys"
    )
    erase.add_argument("subject", help="the subject, as callers authenticate with it")
    erase.add_argument("--dry-run", action="store_true", help="count what would be erased; change nothing")
    erase.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    erase.set_defaults(handler=_command("subjects", "cmd_subjects_erase"))
    subject_export = subjects.add_parser(
        "export", help="everything held about a subject, as JSON (an access request)"
    )
    subject_export.add_argument("subject")
    subject_export.set_defaults(handler=_command("subjects", "cmd_subjects_export"))
    subjects.add_parser(
        "rewrap", help="wrap every subject secret under the last LIVENESS_PROXY_SUBJECT_KEY (key rotation)"
    ).set_defaults(handler=_command("subjects", "cmd_subjects_rewrap"))

    retention = commands.add_parser("retention", help="remove what is past its retention").add_subparsers(
        dest="retention_command", required=True, metavar="ACTION"
    )
    sweep = retention.add_parser(
        "run",
        help="sweep now (LIVENESS_PROXY_RETENTION_DAYS, LIVENESS_PROXY_AUDIT_PLAINTEXT_RETENTION_DAYS, "
        "expired records) and print what was removed",
    )
    sweep.add_argument("--json", action="store_true", help="print the counts and cutoffs as one JSON object")
    sweep.set_defaults(handler=_command("retention", "cmd_retention_run"))

    _add_webhooks(commands)
    return parser


def _add_expires_in(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--expires-in",
        type=_key_lifetime,
        default=DEFAULT_KEY_LIFETIME_DAYS,
        metavar="DAYS",
        help=f"the new key expires after this many days (default {DEFAULT_KEY_LIFETIME_DAYS}); "
        "'never' for a key that does not expire",
    )


def _add_webhooks(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    webhooks = commands.add_parser("webhooks", help="the webhook endpoint and its events").add_subparsers(
        dest="webhooks_command", required=True, metavar="ACTION"
    )
    webhooks.add_parser(
        "secret",
        help="print a new signing secret (whsec_...) for LIVENESS_PROXY_WEBHOOK_SECRET, and nothing else",
    ).set_defaults(handler=_command("webhooks", "cmd_webhooks_secret"))
    webhooks.add_parser(
        "test", help="send a signed liveness.ping to LIVENESS_PROXY_WEBHOOK_URL; exit 1 unless it answers 2xx"
    ).set_defaults(handler=_command("webhooks", "cmd_webhooks_test"))
    listing = webhooks.add_parser("list", help="events, newest first: state, attempts, last status and error")
    listing.add_argument(
        "--failed", action="store_true", help="only dead letters and events whose last try failed"
    )
    listing.add_argument(
        "--json", action="store_true", help='one JSON object: {"endpoint": ..., "events": [...]}'
    )
    listing.add_argument("--session", default=None, metavar="SESSION_ID", help="only this session's events")
    listing.add_argument("--limit", type=_positive_count, default=100, help="at most this many (default 100)")
    listing.set_defaults(handler=_command("webhooks", "cmd_webhooks_list"))
    resend = webhooks.add_parser("resend", help="queue an event again, under the same webhook-id")
    resend.add_argument("event_id", metavar="EVENT_ID")
    resend.set_defaults(handler=_command("webhooks", "cmd_webhooks_resend"))
    webhooks.add_parser("enable", help="re-enable the endpoint after it answered 410 Gone").set_defaults(
        handler=_command("webhooks", "cmd_webhooks_enable")
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigurationError as exc:
        print(f"liveness-proxy: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIGURATION
    except StartRefused as exc:
        print(f"liveness-proxy: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        from liveness_proxy.store import is_store_outage

        if not is_store_outage(exc):
            raise
        # The class name only: a driver's message may quote the URL, password included.
        print(f"liveness-proxy: the database cannot be reached ({type(exc).__name__})", file=sys.stderr)
        return EXIT_FAILURE

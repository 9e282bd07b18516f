"""The `liveness-proxy` command: serve, sandbox, demo, keys, check, db, audit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.auth import new_api_key
from liveness_proxy.errors import ConfigurationError, StartRefused
from liveness_proxy.http import Http1Transport
from liveness_proxy.settings import Settings, redact_url
from liveness_proxy.store import (
    ApiKeyStore,
    AuditChainBroken,
    AuditLog,
    ChainVerdict,
    PurgeResult,
    create_engine,
    current_revision,
    is_store_outage,
    ping,
    upgrade_database,
)
from liveness_proxy.upstream import TokenEndpointError
from liveness_proxy.wiring import create_redis, cynopsis_ssl_context, token_fetcher

EXIT_CONFIGURATION = 2
EXIT_FAILURE = 1


@contextlib.asynccontextmanager
async def _database(settings: Settings, *, migrate: bool = True) -> AsyncIterator[AsyncEngine]:
    """A one-connection engine for a command; migrated first unless the command only reads."""
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        if migrate:
            await upgrade_database(engine)
        yield engine
    finally:
        await engine.dispose()


# -- serve ------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from liveness_proxy.serving import serve

    settings = Settings.load()
    settings.require_proxy_secrets()
    host = args.host or settings.liveness_proxy_host
    port = settings.liveness_proxy_port if args.port is None else args.port
    return serve(
        settings,
        host=host,
        port=port,
        workers=args.workers,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        # Migrations run once here, not in each worker, so workers never race on the schema.
        prepare=lambda: asyncio.run(_upgrade(settings)),
    )


async def _upgrade(settings: Settings) -> None:
    async with _database(settings):
        pass


# -- db ---------------------------------------------------------------------------------------------


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    settings = Settings.load()
    asyncio.run(_upgrade(settings))
    print(f"database is at the latest schema: {redact_url(settings.database_url)}")
    return 0


# -- keys -------------------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    settings = Settings.load()
    settings.require_api_key_pepper()
    issued = asyncio.run(_create_key(settings, subject=args.subject, scopes=args.scope or [], name=args.name))
    if args.json:
        print(orjson.dumps({"id": issued[0], "key": issued[1]}).decode())
    else:
        print(
            f"created API key {issued[0]} for subject {args.subject!r}; it is shown only once:",
            file=sys.stderr,
        )
        print(issued[1])
    return 0


async def _create_key(
    settings: Settings, *, subject: str, scopes: Sequence[str], name: str
) -> tuple[str, str]:
    async with _database(settings) as engine:
        try:
            issued = new_api_key(
                pepper=settings.liveness_proxy_api_key_pepper.get_secret_value().encode(),
                subject=subject,
                scopes=scopes,
                name=name or subject,
                now=time.time(),
            )
        except ValueError as exc:
            raise ConfigurationError(f"keys create: {exc}") from None
        await ApiKeyStore(engine).add(issued.stored)
        return issued.key_id, issued.key


def cmd_keys_list(args: argparse.Namespace) -> int:
    settings = Settings.load()

    async def run() -> None:
        async with _database(settings) as engine:
            keys = await ApiKeyStore(engine).list()
        if args.json:
            for key in keys:
                print(
                    orjson.dumps(
                        {
                            "id": key.key_id,
                            "name": key.name,
                            "subject": key.subject,
                            "scopes": list(key.scopes),
                            "created_at": key.created_at,
                            "revoked_at": key.revoked_at,
                        }
                    ).decode()
                )
            return
        print(f"{'ID':<18} {'SUBJECT':<24} {'STATE':<8} {'CREATED (UTC)':<20} {'SCOPES':<24} NAME")
        for key in keys:
            state = "revoked" if key.revoked_at is not None else "active"
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(key.created_at))
            print(
                f"{key.key_id:<18} {key.subject:<24} {state:<8} {created:<20} "
                f"{' '.join(key.scopes):<24} {key.name}"
            )

    asyncio.run(run())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    settings = Settings.load()

    async def run() -> bool:
        async with _database(settings) as engine:
            return await ApiKeyStore(engine).revoke(args.key_id, revoked_at=time.time())

    if asyncio.run(run()):
        print(
            f"revoked {args.key_id} (running proxies stop accepting it within "
            "LIVENESS_PROXY_API_KEY_CACHE_SECONDS)"
        )
        return 0
    print(f"no active key with id {args.key_id!r}", file=sys.stderr)
    return EXIT_FAILURE


# -- check ------------------------------------------------------------------------------------------


def cmd_check(_args: argparse.Namespace) -> int:
    settings = Settings.load()
    for name, value in settings.redacted_summary().items():
        print(f"{name}={value}")
    settings.require_proxy_secrets()
    return asyncio.run(_check_live(settings))


async def _check_live(settings: Settings) -> int:
    ok = True
    async with _database(settings, migrate=False) as engine:
        try:
            await ping(engine)
            revision = await current_revision(engine)
            print(
                f"database: reachable (schema revision {revision or 'none: run `liveness-proxy db upgrade`'})"
            )
        except Exception as exc:
            print(f"database: FAILED ({type(exc).__name__})")
            ok = False
    redis = create_redis(settings)
    if redis is not None:
        try:
            await redis.ping()
            print("redis: reachable (token and limits shared across processes)")
        except Exception as exc:
            print(f"redis: FAILED ({type(exc).__name__}; the proxy would run degraded, per process)")
            ok = False
        finally:
            await redis.aclose()
    async with Http1Transport(
        max_connections=4,
        connect_timeout_seconds=settings.cynopsis_connect_timeout_seconds,
        ssl_context=cynopsis_ssl_context(settings),
    ) as http:
        try:
            token = await token_fetcher(http, settings).fetch()
            print(f"upstream token: obtained (lifetime {int(token.lifetime_seconds)} s; value hidden)")
        except TokenEndpointError as exc:
            print(f"upstream token: FAILED ({exc})")
            ok = False
    print("check: OK" if ok else "check: FAILED")
    return 0 if ok else EXIT_FAILURE


# -- audit ------------------------------------------------------------------------------------------

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


def _utc(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="seconds")


@contextlib.asynccontextmanager
async def _audit_database(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The audit commands never migrate (a reader must not change the schema under a running older
    proxy); they refuse a database that is not at the schema this version writes."""
    from alembic.script import ScriptDirectory

    from liveness_proxy.store.database import alembic_config

    async with _database(settings, migrate=False) as engine:
        revision = await current_revision(engine)
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        if revision != head:
            raise ConfigurationError(
                f"the database schema is at revision {revision or 'none'}, this version needs {head}: "
                "run `liveness-proxy db upgrade`"
            )
        yield engine


def cmd_audit_export(args: argparse.Namespace) -> int:
    if args.since is not None and args.until is not None and args.since >= args.until:
        print("liveness-proxy audit export: --since must be earlier than --until", file=sys.stderr)
        return EXIT_CONFIGURATION
    settings = Settings.load()

    async def run() -> None:
        out = sys.stdout.buffer
        async with _audit_database(settings) as engine:
            async for record in AuditLog(engine).iterate(since=args.since, until=args.until):
                out.write(orjson.dumps(record) + b"\n")
        out.flush()

    asyncio.run(run())
    return 0


def cmd_audit_verify(_args: argparse.Namespace) -> int:
    settings = Settings.load()

    async def run() -> ChainVerdict:
        async with _audit_database(settings) as engine:
            return await AuditLog(engine).verify()

    verdict = asyncio.run(run())
    if verdict.problem is not None:
        problem = verdict.problem
        record_id = "-" if problem.record_id is None else problem.record_id  # a truncated tail has none
        print(
            f"audit chain BROKEN at seq {problem.seq} (id {record_id}): "
            f"{problem.kind}: {problem.detail}; {verdict.records} records verified before it"
        )
        return EXIT_FAILURE
    span = f" (seq {verdict.first_seq}..{verdict.head_seq})" if verdict.records else ""
    purged = f"; records up to seq {verdict.anchor_seq} were purged" if verdict.anchor_seq else ""
    print(f"audit chain OK: {verdict.records} records verified{span}{purged}; head hash {verdict.head_hash}")
    return 0


def cmd_audit_purge(args: argparse.Namespace) -> int:
    settings = Settings.load()
    cutoff = time.time() - args.older_than * 86400

    async def run() -> PurgeResult:
        async with _audit_database(settings) as engine:
            return await AuditLog(engine).purge(older_than=cutoff)

    try:
        result = asyncio.run(run())
    except AuditChainBroken as exc:
        print(f"audit purge refused, nothing more deleted: the chain is broken at {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"purged {result.purged} audit records older than {_utc(cutoff)}; "
        f"the chain now starts after seq {result.anchor_seq}"
    )
    return 0


# -- sandbox and demo -------------------------------------------------------------------------------


def cmd_sandbox(args: argparse.Namespace) -> int:
    from liveness_proxy.sandbox import SandboxConfig, serve_sandbox

    config = SandboxConfig(
        client_id=args.client_id,
        client_secret=args.client_secret,
        domain_id=args.domain_id,
        control_enabled=args.control,
    )
    print(
        f"sandbox Cynopsis API on http://{args.host}:{args.port} "
        f"(client_id={args.client_id}, domain={args.domain_id}, "
        f"control API {'on' if args.control else 'off'})",
        file=sys.stderr,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_sandbox(config, args.host, args.port))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from liveness_proxy.demo import run_demo

    try:
        return asyncio.run(
            run_demo(
                directory=args.dir,
                host=args.host,
                port=args.port,
                sandbox_port=args.sandbox_port,
                walkthrough_only=args.walkthrough_only,
            )
        )
    except KeyboardInterrupt:
        return 0


# -- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liveness-proxy",
        description="A security-first backend proxy for the Cynopsis Liveness API.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy from configuration")
    serve.add_argument("--host", default=None, help="bind address (default LIVENESS_PROXY_HOST)")
    serve.add_argument("--port", type=int, default=None, help="port (default LIVENESS_PROXY_PORT)")
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
    serve.set_defaults(handler=cmd_serve)

    sandbox = commands.add_parser("sandbox", help="run only the simulated Cynopsis API")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8081)
    sandbox.add_argument("--client-id", default="sandbox-client")
    sandbox.add_argument("--client-secret", default="sandbox-secret")
    sandbox.add_argument("--domain-id", default="sandbox-domain")
    sandbox.add_argument("--control", action="store_true", help="enable the /_sandbox control API")
    sandbox.set_defaults(handler=cmd_sandbox)

    demo = commands.add_parser("demo", help="sandbox + proxy in one command, with a demo API key")
    demo.add_argument("--dir", default=".liveness-demo", help="folder for the demo database and pepper")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--sandbox-port", type=int, default=8081)
    demo.add_argument(
        "--walkthrough-only",
        action="store_true",
        help="run the whole flow once against the started services, print it, and exit",
    )
    demo.set_defaults(handler=cmd_demo)

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    create = keys.add_parser("create", help="create a key (printed once, last line of stdout)")
    create.add_argument("--subject", required=True, help="the subject sessions are bound to")
    create.add_argument("--scope", action="append", help="a scope, e.g. liveness:admin (repeatable)")
    create.add_argument("--name", default="", help="a label for humans")
    create.add_argument("--json", action="store_true", help='print {"id": ..., "key": ...}')
    create.set_defaults(handler=cmd_keys_create)
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=cmd_keys_revoke)

    check = commands.add_parser("check", help="validate configuration and fetch an upstream token")
    check.set_defaults(handler=cmd_check)

    db = commands.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    db.add_parser("upgrade", help="apply migrations").set_defaults(handler=cmd_db_upgrade)

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
    export.set_defaults(handler=cmd_audit_export)
    verify = audit.add_parser("verify", help="check the hash chain; exit 1 naming the first bad record")
    verify.set_defaults(handler=cmd_audit_verify)
    purge = audit.add_parser("purge", help="delete the oldest records; the chain stays verifiable")
    purge.add_argument(
        "--older-than", type=_positive_days, required=True, metavar="DAYS", help="age in whole days (> 0)"
    )
    purge.set_defaults(handler=cmd_audit_purge)
    return parser


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
        if not is_store_outage(exc):
            raise
        # The class name only: a driver's message may quote the URL, password included.
        print(f"liveness-proxy: the database cannot be reached ({type(exc).__name__})", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

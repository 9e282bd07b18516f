"""`check`: the configuration, then the database, Redis and an upstream token, live."""

from __future__ import annotations

import argparse
import asyncio

from liveness_proxy.cli import EXIT_FAILURE
from liveness_proxy.cli.db import open_database
from liveness_proxy.http import Http1Transport
from liveness_proxy.settings import Settings
from liveness_proxy.store import current_revision, ping
from liveness_proxy.upstream import TokenEndpointError
from liveness_proxy.wiring import (
    audit_checkpoint_options,
    check_startable,
    create_redis,
    cynopsis_ssl_context,
    final_result_store_line,
    token_fetcher,
)


def cmd_check(_args: argparse.Namespace) -> int:
    settings = Settings.load()
    for name, value in settings.redacted_summary().items():
        print(f"{name}={value}")
    # What `serve` refuses before it binds a port (the secrets, the audit and subject keys, TLS
    # files, the JWT set-up), `check` refuses too, with the same one line.
    check_startable(settings)
    print(audit_checkpoints_line(settings))
    print(f"final result store: {final_result_store_line(settings)}")
    return asyncio.run(_check_live(settings))


def audit_checkpoints_line(settings: Settings) -> str:
    """Whether signed audit checkpoints are written, and where (ConfigurationError for a bad key)."""
    checkpoints = audit_checkpoint_options(settings)
    if checkpoints is None:
        return "audit checkpoints: off (no LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE: none are written)"
    places = "the log stream" + ("" if checkpoints.file is None else f" and {checkpoints.file}")
    return (
        f"audit checkpoints: signed with key {checkpoints.signer.fingerprint}, "
        f"every {checkpoints.interval_seconds:g} s while the chain grows, to {places}"
    )


async def _check_live(settings: Settings) -> int:
    ok = True
    async with open_database(settings, migrate=False) as engine:
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

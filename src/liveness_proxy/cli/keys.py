"""`keys create | list | revoke`: API keys in the database."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

import orjson

from liveness_proxy.auth import new_api_key
from liveness_proxy.cli import EXIT_FAILURE
from liveness_proxy.cli.db import open_database
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.settings import Settings
from liveness_proxy.store import ApiKeyStore


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
    async with open_database(settings) as engine:
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
        async with open_database(settings) as engine:
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
        async with open_database(settings) as engine:
            return await ApiKeyStore(engine).revoke(args.key_id, revoked_at=time.time())

    if asyncio.run(run()):
        print(
            f"revoked {args.key_id} (running proxies stop accepting it within "
            "LIVENESS_PROXY_API_KEY_CACHE_SECONDS)"
        )
        return 0
    print(f"no active key with id {args.key_id!r}", file=sys.stderr)
    return EXIT_FAILURE

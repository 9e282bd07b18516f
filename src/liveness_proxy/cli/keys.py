"""`keys create | list | revoke | rotate`: API keys in the database."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

import orjson

from liveness_proxy.auth import IssuedApiKey, new_api_key
from liveness_proxy.cli import EXIT_FAILURE
from liveness_proxy.cli.db import open_database
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.settings import Settings
from liveness_proxy.store import ApiKeyStore, KeyNotRotatable, StoredApiKey

_DAY_SECONDS = 86400


def cmd_keys_create(args: argparse.Namespace) -> int:
    settings = Settings.load()
    settings.require_api_key_pepper()
    issued = asyncio.run(
        _create_key(
            settings, subject=args.subject, scopes=args.scope or [], name=args.name, days=args.expires_in
        )
    )
    if args.json:
        print(
            orjson.dumps(
                {"id": issued.key_id, "key": issued.key, "expires_at": issued.stored.expires_at}
            ).decode()
        )
    else:
        print(
            f"created API key {issued.key_id} for subject {args.subject!r}, "
            f"{_expiry_phrase(issued.stored.expires_at)}; it is shown only once:",
            file=sys.stderr,
        )
        print(issued.key)
    return 0


async def _create_key(
    settings: Settings, *, subject: str, scopes: Sequence[str], name: str, days: int | None
) -> IssuedApiKey:
    async with open_database(settings) as engine:
        now = time.time()
        try:
            issued = new_api_key(
                pepper=_pepper(settings),
                subject=subject,
                scopes=scopes,
                name=name or subject,
                now=now,
                expires_at=_expiry(now, days),
            )
        except ValueError as exc:
            raise ConfigurationError(f"keys create: {exc}") from None
        await ApiKeyStore(engine).add(issued.stored)
        return issued


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    settings = Settings.load()
    settings.require_api_key_pepper()
    try:
        issued, old_expires_at = asyncio.run(
            _rotate_key(settings, args.key_id, overlap_days=args.overlap_days, days=args.expires_in)
        )
    except KeyNotRotatable as exc:
        print(f"keys rotate: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(
            orjson.dumps(
                {
                    "id": issued.key_id,
                    "key": issued.key,
                    "expires_at": issued.stored.expires_at,
                    "successor_of": args.key_id,
                    "successor_of_expires_at": old_expires_at,
                }
            ).decode()
        )
    else:
        print(
            f"created API key {issued.key_id} for subject {issued.stored.subject!r} to replace "
            f"{args.key_id}, {_expiry_phrase(issued.stored.expires_at)}; {args.key_id} stops working "
            f"at {_utc(old_expires_at)} UTC. The new key is shown only once:",
            file=sys.stderr,
        )
        print(issued.key)
    return 0


async def _rotate_key(
    settings: Settings, key_id: str, *, overlap_days: int, days: int | None
) -> tuple[IssuedApiKey, float]:
    async with open_database(settings) as engine:
        store = ApiKeyStore(engine)
        now = time.time()
        old = await store.get(key_id)
        if old is None:
            raise KeyNotRotatable(f"no key with id {key_id!r}")
        issued = new_api_key(
            pepper=_pepper(settings),
            subject=old.subject,
            scopes=old.scopes,
            name=old.name,
            now=now,
            expires_at=_expiry(now, days),
            successor_of=key_id,
        )
        # The store checks again, in the transaction, that the old key is still usable.
        old_expires_at = await store.rotate(
            issued.stored, old_expires_at=now + overlap_days * _DAY_SECONDS, now=now
        )
        return issued, old_expires_at


def cmd_keys_list(args: argparse.Namespace) -> int:
    settings = Settings.load()

    async def run() -> None:
        async with open_database(settings) as engine:
            keys = await ApiKeyStore(engine).list()
        now = time.time()
        if args.json:
            for key in keys:
                print(orjson.dumps(_listed(key, now)).decode())
            return
        print(
            f"{'ID':<18} {'SUBJECT':<24} {'STATE':<8} {'CREATED (UTC)':<20} {'EXPIRES (UTC)':<20} "
            f"{'LAST USED (UTC)':<20} {'SCOPES':<24} NAME"
        )
        for key in keys:
            print(
                f"{key.key_id:<18} {key.subject:<24} {key.state(now):<8} {_utc(key.created_at):<20} "
                f"{_utc(key.expires_at):<20} {_utc(key.last_used_at):<20} "
                f"{' '.join(key.scopes):<24} {key.name}"
            )

    asyncio.run(run())
    return 0


def _listed(key: StoredApiKey, now: float) -> dict[str, object]:
    return {
        "id": key.key_id,
        "name": key.name,
        "subject": key.subject,
        "scopes": list(key.scopes),
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "expires_at": key.expires_at,
        "last_used_at": key.last_used_at,
        "successor_of": key.successor_of,
        "state": key.state(now),
    }


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


def _pepper(settings: Settings) -> bytes:
    return settings.liveness_proxy_api_key_pepper.get_secret_value().encode()


def _expiry(now: float, days: int | None) -> float | None:
    return None if days is None else now + days * _DAY_SECONDS


def _expiry_phrase(expires_at: float | None) -> str:
    return "never expiring" if expires_at is None else f"expiring {_utc(expires_at)} UTC"


def _utc(moment: float | None) -> str:
    return "never" if moment is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(moment))

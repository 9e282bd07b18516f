"""`subjects erase | export | rewrap`: a data subject's erasure, their access request, and the
subject-key rotation."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson
from sqlalchemy import select, update

from liveness_proxy.auth.session_tokens import KeyedHash
from liveness_proxy.cli import EXIT_CONFIGURATION
from liveness_proxy.cli.audit import current_schema_database, exported
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.settings import Settings
from liveness_proxy.store.erasure import Erasure, ErasureResult, RedisKeys
from liveness_proxy.store.subject_export import export_subject
from liveness_proxy.store.subjects import SubjectKeyError, SubjectRegistry
from liveness_proxy.store.tables import subject_secrets
from liveness_proxy.wiring.parts import create_redis, privacy_keys


def cmd_subjects_erase(args: argparse.Namespace) -> int:
    if "\x00" in args.subject or not args.subject:
        print("liveness-proxy subjects erase: a subject is 1-255 characters without NUL", file=sys.stderr)
        return EXIT_CONFIGURATION
    settings = Settings.load()
    keys = privacy_keys(settings)

    async def run() -> ErasureResult:
        redis = create_redis(settings)
        try:
            async with current_schema_database(settings) as engine:
                erasure = Erasure(
                    engine,
                    SubjectRegistry(engine, keys.subjects),
                    keys.audit,
                    binding_hash=KeyedHash(
                        settings.liveness_proxy_api_key_pepper.get_secret_value().encode()
                    ).subject,
                    wall_clock=time.time,
                    redis=None
                    if redis is None
                    else RedisKeys(redis, settings.liveness_proxy_redis_key_prefix),
                )
                return await erasure.erase_subject(args.subject, request_id="cli-erase", dry_run=args.dry_run)
        finally:
            if redis is not None:
                await redis.aclose()

    result = asyncio.run(run())
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result.as_dict()) + b"\n")
        return 0
    counts = ", ".join(
        f"{name.replace('_', ' ')}: {count}" for name, count in result.counts.as_dict().items()
    )
    verb = "would erase" if result.dry_run else "erased"
    if result.commitment is None and result.counts.total == 0:
        print(f"nothing to erase: no data is held about this subject ({verb} {counts})")
    else:
        print(f"{verb} subject with commitment {result.commitment or '(none)'}: {counts}")
    return 0


def cmd_subjects_export(args: argparse.Namespace) -> int:
    settings = Settings.load()
    keys = privacy_keys(settings)

    async def run() -> dict[str, Any]:
        async with current_schema_database(settings) as engine:
            return await export_subject(
                engine, SubjectRegistry(engine, keys.subjects), args.subject, exported
            )

    sys.stdout.buffer.write(orjson.dumps(asyncio.run(run()), option=orjson.OPT_INDENT_2) + b"\n")
    return 0


# Secrets rewrapped per transaction: on SQLite a transaction holds the write lock, which a running
# proxy waits for (up to its busy timeout) to write anything at all.
REWRAP_BATCH = 500


def cmd_subjects_rewrap(_args: argparse.Namespace) -> int:
    """Wraps every subject secret under the last subject key (after a key was added), so that the
    older keys can be removed from LIVENESS_PROXY_SUBJECT_KEY. Safe to run again, and beside a
    running proxy: a row is rewritten only if it still holds what was read (an erasure, or a new
    secret for a subject who came back, in between is left alone)."""
    settings = Settings.load()
    keys = privacy_keys(settings).subjects
    changed = 0

    async def run() -> None:
        nonlocal changed
        after = ""
        async with current_schema_database(settings) as engine:
            while True:
                async with engine.begin() as connection:
                    rows = (
                        await connection.execute(
                            select(subject_secrets.c.lookup, subject_secrets.c.wrapped)
                            .where(subject_secrets.c.lookup > after)
                            .order_by(subject_secrets.c.lookup)
                            .limit(REWRAP_BATCH)
                        )
                    ).all()
                    if not rows:
                        return
                    after = str(rows[-1].lookup)
                    for lookup, wrapped in rows:
                        if str(wrapped).partition(".")[0] == keys.current_key_id:
                            continue
                        secret = keys.unwrap(str(lookup), str(wrapped))
                        result = await connection.execute(
                            update(subject_secrets)
                            .where(subject_secrets.c.lookup == lookup, subject_secrets.c.wrapped == wrapped)
                            .values(wrapped=keys.wrap(str(lookup), secret))
                        )
                        changed += result.rowcount

    try:
        asyncio.run(run())
    except SubjectKeyError as exc:
        # Each batch commits on its own: what was rewrapped before stays so (it is valid either way).
        raise ConfigurationError(
            f"LIVENESS_PROXY_SUBJECT_KEY: {exc}; keep that key as an earlier line until the rewrap "
            f"is done ({changed} secrets rewrapped so far)"
        ) from None
    print(f"{changed} subject secrets wrapped again under key {keys.current_key_id}")
    return 0

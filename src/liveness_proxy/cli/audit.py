"""`audit export | verify | purge`: the audit log, read (and purged) without migrating."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import sys
import time
from collections.abc import AsyncIterator

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.cli import EXIT_CONFIGURATION, EXIT_FAILURE
from liveness_proxy.cli.db import open_database
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.settings import Settings
from liveness_proxy.store import AuditChainBroken, AuditLog, ChainVerdict, PurgeResult, current_revision


def _utc(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="seconds")


@contextlib.asynccontextmanager
async def _audit_database(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The audit commands never migrate (a reader must not change the schema under a running older
    proxy); they refuse a database that is not at the schema this version writes."""
    from alembic.script import ScriptDirectory

    from liveness_proxy.store.database import alembic_config

    async with open_database(settings, migrate=False) as engine:
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

"""`audit export | verify | purge`: the audit log, read (and purged) without migrating."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.cli import EXIT_CONFIGURATION, EXIT_FAILURE
from liveness_proxy.cli.db import open_database
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.settings import Settings
from liveness_proxy.store import AuditChainBroken, AuditLog, ChainVerdict, PurgeResult, current_revision
from liveness_proxy.store.audit import iterate_records
from liveness_proxy.store.audit_chain import AGGREGATE_ACTIONS, SYSTEM_ACTIONS
from liveness_proxy.store.subjects import SubjectRegistry
from liveness_proxy.wiring.parts import privacy_keys


def _utc(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="seconds")


@contextlib.asynccontextmanager
async def current_schema_database(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The engine of a command that must not migrate (the audit commands, `webhooks list | resend |
    enable`): a reader or an operator's fix must not change the schema under a running older proxy.
    It refuses a database that is not at the schema this version writes."""
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


def exported(record: dict[str, Any]) -> dict[str, Any]:
    """A record as `audit export` prints it: every column, plus `kind`, "system" for the events the
    proxy records on its own (verdicts, deliveries: `SYSTEM_ACTIONS`), "aggregate" for a window's
    failed authentications (`AGGREGATE_ACTIONS`) and "request" for the one record of each
    authenticated request; and `erased`, true once the record's plain values were erased (an erasure
    or the plain-text retention: `subject` and `personal` are then null). Neither is hashed (both
    follow from hashed or plain columns). `detail` stays the JSON string it was hashed as: parsed and
    written again it might not be the same bytes (key order, number formatting), and then no one
    could recompute `record_hash` from the export."""
    action = record["action"]
    kind = "system" if action in SYSTEM_ACTIONS else "aggregate" if action in AGGREGATE_ACTIONS else "request"
    # Erased plain values: null, and `erased` says why (their commitments are still there).
    return {**record, "kind": kind, "erased": record.get("erased_at") is not None}


def cmd_audit_export(args: argparse.Namespace) -> int:
    if args.since is not None and args.until is not None and args.since >= args.until:
        print("liveness-proxy audit export: --since must be earlier than --until", file=sys.stderr)
        return EXIT_CONFIGURATION
    settings = Settings.load()

    async def run() -> None:
        out = sys.stdout.buffer
        async with current_schema_database(settings) as engine:
            async for record in iterate_records(engine, since=args.since, until=args.until):
                out.write(orjson.dumps(exported(record)) + b"\n")
        out.flush()

    asyncio.run(run())
    return 0


def cmd_audit_verify(_args: argparse.Namespace) -> int:
    settings = Settings.load()

    async def run() -> ChainVerdict:
        keys = privacy_keys(settings)
        async with current_schema_database(settings) as engine:
            return await AuditLog(engine, keys.audit).verify(subjects=SubjectRegistry(engine, keys.subjects))

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
        async with current_schema_database(settings) as engine:
            return await AuditLog(engine, privacy_keys(settings).audit).purge(older_than=cutoff)

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

"""`audit export | verify | purge | signing-key`: the audit log, read (and purged) without migrating,
and the key its checkpoints are signed with."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.cli import EXIT_CONFIGURATION, EXIT_FAILURE
from liveness_proxy.cli.db import open_database
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.settings import Settings
from liveness_proxy.store import AuditChainBroken, AuditLog, ChainVerdict, PurgeResult, current_revision
from liveness_proxy.store.audit import iterate_records
from liveness_proxy.store.audit_chain import AGGREGATE_ACTIONS, SYSTEM_ACTIONS
from liveness_proxy.store.audit_checkpoints import (
    CheckpointReport,
    CheckpointSigner,
    load_public_key_pem,
    new_signing_key_pem,
    public_key_pem,
    read_key_file,
    verify_checkpoints,
)
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


def cmd_audit_verify(args: argparse.Namespace) -> int:
    checkpoints_file: str | None = args.checkpoints
    if args.public_key and checkpoints_file is None:
        print("liveness-proxy audit verify: --public-key only with --checkpoints", file=sys.stderr)
        return EXIT_CONFIGURATION
    settings = Settings.load()
    # Keys first: a configuration problem ends the command before the database is opened.
    public_keys = None if checkpoints_file is None else _verifying_keys(settings, args.public_key or [])

    async def run(lines: Iterable[bytes] | None) -> tuple[ChainVerdict, CheckpointReport | None]:
        keys = privacy_keys(settings)
        async with current_schema_database(settings) as engine:
            verdict = await AuditLog(engine, keys.audit).verify(
                subjects=SubjectRegistry(engine, keys.subjects)
            )
            if lines is None or public_keys is None:
                return verdict, None
            return verdict, await verify_checkpoints(engine, lines, public_keys)

    if checkpoints_file is None:
        verdict, report = asyncio.run(run(None))
    else:
        with _open_lines(checkpoints_file) as lines:
            verdict, report = asyncio.run(run(lines))
    if verdict.problem is not None:
        problem = verdict.problem
        record_id = "-" if problem.record_id is None else problem.record_id  # a truncated tail has none
        print(
            f"audit chain BROKEN at seq {problem.seq} (id {record_id}): "
            f"{problem.kind}: {problem.detail}; {verdict.records} records verified before it"
        )
    else:
        span = f" (seq {verdict.first_seq}..{verdict.head_seq})" if verdict.records else ""
        purged = f"; records up to seq {verdict.anchor_seq} were purged" if verdict.anchor_seq else ""
        print(
            f"audit chain OK: {verdict.records} records verified{span}{purged}; head hash {verdict.head_hash}"
        )
    checkpoints_ok = report is None or _print_checkpoint_report(report, str(checkpoints_file))
    return 0 if verdict.ok and checkpoints_ok else EXIT_FAILURE


# Problems printed one per line; past this many, a count (a restore can contradict thousands).
MAX_PRINTED_PROBLEMS = 100


def _print_checkpoint_report(report: CheckpointReport, source: str) -> bool:
    """Prints the summary; whether the checkpoints hold (at least one found, no problem)."""
    skipped = f"; {_count(report.other_lines, 'other log line')} skipped" if report.other_lines else ""
    purged = ""
    if report.before_anchor:
        purged = (
            f", {report.before_anchor} at or before the purge anchor (seq {report.anchor_seq}: "
            "no longer comparable)"
        )
    if report.checked == 0 and report.ok:
        print(f"audit checkpoints: NONE found in {source}{skipped}: nothing was checked")
        return False
    if not report.ok:
        print(
            f"audit checkpoints FAILED: {_count(len(report.problems), 'problem')}; "
            f"{_count(report.checked, 'checkpoint')} read, "
            f"{report.matched} match the chain{purged}{skipped}"
        )
        for problem in report.problems[:MAX_PRINTED_PROBLEMS]:
            print(f"  {problem}")
        if len(report.problems) > MAX_PRINTED_PROBLEMS:
            print(f"  … and {len(report.problems) - MAX_PRINTED_PROBLEMS} more")
        return False
    newest = ""
    latest = report.latest
    if latest is not None:
        newest = f"; the latest: seq {latest.seq}, signed {latest.at} with key {latest.key}"
        if latest.seq < report.head_seq:
            newest += f" (seq {latest.seq + 1}..{report.head_seq} are covered by no checkpoint yet)"
    print(
        f"audit checkpoints OK: {report.matched} of {report.checked} match the chain{purged}{newest}{skipped}"
    )
    return True


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _verifying_keys(settings: Settings, paths: list[str]) -> list[Ed25519PublicKey]:
    """The public keys given with --public-key, or else the one of the configured signing key."""
    keys = []
    for path in paths:
        try:
            keys.append(load_public_key_pem(read_key_file(Path(path))))
        except ValueError as exc:
            raise ConfigurationError(f"--public-key {path}: {exc}") from None
    if keys:
        return keys
    signing_key = settings.liveness_proxy_audit_signing_key_file
    if signing_key is None:
        raise ConfigurationError(
            "audit verify --checkpoints: no public key to check the signatures with: pass "
            "--public-key PEMFILE (repeatable), or set LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE"
        )
    try:
        return [CheckpointSigner.from_file(signing_key).public_key]
    except ValueError as exc:
        raise ConfigurationError(f"LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE: {exc}") from None


@contextlib.contextmanager
def _open_lines(source: str) -> Iterator[Iterable[bytes]]:
    """The lines of `source`, a path or `-` for stdin (a log stream piped in)."""
    if source == "-":
        yield sys.stdin.buffer
        return
    try:
        file = Path(source).open("rb")  # noqa: SIM115 - closed by the with below, after the yield
    except OSError as exc:
        raise ConfigurationError(
            f"--checkpoints {source}: cannot read the file ({exc.strerror or type(exc).__name__})"
        ) from None
    with file:
        yield file


def cmd_audit_signing_key(args: argparse.Namespace) -> int:
    """Writes a new Ed25519 private key (mode 0600, never over an existing file) and prints its
    public key, for the auditors, on stdout."""
    path = Path(args.out)
    pem = new_signing_key_pem()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        print(f"liveness-proxy audit signing-key: {path} exists; not overwritten", file=sys.stderr)
        return EXIT_CONFIGURATION
    except OSError as exc:
        print(f"liveness-proxy audit signing-key: cannot create {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIGURATION
    try:
        os.write(descriptor, pem)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    signer = CheckpointSigner.from_pem(pem)
    print(
        f"wrote the audit signing key {signer.fingerprint} to {path} (mode 0600): set "
        "LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE to it; its public key follows on stdout, for the auditors",
        file=sys.stderr,
    )
    sys.stdout.write(public_key_pem(signer.public_key).decode("ascii"))
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

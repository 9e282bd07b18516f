"""Signed audit checkpoints against the chain (store/audit_checkpoints.py): the reviewer's forgery, a
restore from backup, purges, forged and foreign signatures, and the writer (only when the head
moved, on close, through outages, to the log stream and a file), and the wiring around it.

Every database test runs on SQLite and on PostgreSQL (a scratch database per test)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from integration.test_audit_chain import execute, fill, record
from liveness_proxy.metrics import ProxyMetrics
from liveness_proxy.observability import Redactor, build_logger
from liveness_proxy.store import AuditLog, create_engine, upgrade_database
from liveness_proxy.store.audit_chain import HEAD_ROW_ID
from liveness_proxy.store.audit_checkpoints import (
    CHECKPOINT_FILE_MODE,
    CheckpointReport,
    CheckpointSigner,
    CheckpointWriter,
    checkpoint_line,
    make_checkpoint,
    new_signing_key_pem,
    read_head,
    verify_checkpoints,
)
from liveness_proxy.store.tables import audit_chain_head, audit_records
from liveness_proxy.wiring import running_service
from support import TEST_AUDIT_KEYS, TEST_KEYS, proxy_settings


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(database_url)
    await upgrade_database(made, keys=TEST_KEYS)
    yield made
    await made.dispose()


@pytest.fixture
def signer() -> CheckpointSigner:
    return CheckpointSigner.from_pem(new_signing_key_pem())


class LogStream:
    """The proxy's own JSON log pipeline (redaction included), into memory."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.logger = build_logger(level="info", log_format="json", redactor=Redactor(), stream=self.stream)

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [event for event in map(json.loads, self.lines()) if event["event"] == name]


async def checkpoint_now(engine: AsyncEngine, signer: CheckpointSigner) -> str:
    """One checkpoint of the head as it is now, as a line of the checkpoint file."""
    return checkpoint_line(make_checkpoint(signer, await read_head(engine), at=time.time())).decode()


async def check(engine: AsyncEngine, lines: list[str], *keys: CheckpointSigner) -> CheckpointReport:
    return await verify_checkpoints(engine, lines, [key.public_key for key in keys])


def kinds(report: CheckpointReport) -> list[tuple[int, str, int | None]]:
    return [(problem.line, problem.kind, problem.seq) for problem in report.problems]


# -- round trip -------------------------------------------------------------------------------------


async def test_checkpoints_of_a_growing_chain_all_verify(
    engine: AsyncEngine, signer: CheckpointSigner
) -> None:
    lines = []
    for _ in range(3):
        await fill(engine, 4)
        lines.append(await checkpoint_now(engine, signer))
    report = await check(engine, ["", *lines, "   "], signer)
    assert report.ok, report.problems
    assert (report.checked, report.matched, report.before_anchor, report.head_seq) == (3, 3, 0, 12)
    assert report.latest is not None
    assert (report.latest.seq, report.latest.line) == (12, 4)  # blank lines count in the numbering


async def test_a_forged_or_altered_signature_is_reported_as_forged(
    engine: AsyncEngine, signer: CheckpointSigner
) -> None:
    await fill(engine, 5)
    genuine = json.loads(await checkpoint_now(engine, signer))
    flipped = bytearray(base64.b64decode(genuine["signature"] + "=="))
    flipped[0] ^= 1
    lines = [
        json.dumps({**genuine, "signature": base64.b64encode(bytes(flipped)).decode().rstrip("=")}),
        json.dumps({**genuine, "seq": 4}),  # a claim the key never signed
        json.dumps({**genuine, "signature": "not base64!"}),
        json.dumps({**genuine, "signature": genuine["signature"] + "=="}),  # padded: not the format
        json.dumps(genuine),
    ]
    report = await check(engine, lines, signer)
    assert kinds(report) == [(1, "forged", 5), (2, "forged", 4), (3, "forged", 5), (4, "forged", 5)]
    assert "does not verify with key" in report.problems[0].detail
    assert report.matched == 1


async def test_a_checkpoint_from_another_key_is_forged_unless_that_key_is_given(
    engine: AsyncEngine, signer: CheckpointSigner
) -> None:
    await fill(engine, 5)
    other = CheckpointSigner.from_pem(new_signing_key_pem())
    lines = [await checkpoint_now(engine, other), await checkpoint_now(engine, signer)]
    report = await check(engine, lines, signer)
    assert kinds(report) == [(1, "forged", 5)]
    assert (
        f"signed by key {other.fingerprint}, which is none of the public keys given"
        in report.problems[0].detail
    )
    # After a rotation the auditor passes the old public key too.
    assert (await check(engine, lines, signer, other)).ok


async def test_lines_that_are_not_checkpoints_are_problems_with_their_line_numbers(
    engine: AsyncEngine, signer: CheckpointSigner
) -> None:
    await fill(engine, 2)
    lines = [
        '{"event": "request", "level": "info"}',  # another log event: skipped
        "garbage",
        "",
        await checkpoint_now(engine, signer),
        '{"no": "event"}',
    ]
    report = await check(engine, lines, signer)
    assert kinds(report) == [(2, "unreadable", None), (5, "unreadable", None)]
    assert str(report.problems[0]) == "line 2: unreadable: not JSON"
    assert (report.checked, report.matched, report.other_lines) == (1, 1, 1)


# -- the reviewer's forgery -------------------------------------------------------------------------


async def forge(engine: AsyncEngine, *, seq: int, status: int, keep: int) -> None:
    """What the reviewer did with write access to the database: change one record, recompute every
    later hash with the audit key (the worst case: a forger who holds it), delete the records after
    `keep`, lower the head."""
    async with engine.begin() as connection:
        stored = (await connection.execute(select(audit_records).order_by(audit_records.c.seq))).all()
        prev_hash = "0" * 64
        for row in stored:
            if row.seq > keep:
                break
            values = dict(row._mapping)
            if row.seq == seq:
                values["status"] = status
            values["prev_hash"] = prev_hash
            values["record_hash"] = prev_hash = TEST_AUDIT_KEYS.sign(values)
            await connection.execute(
                update(audit_records)
                .where(audit_records.c.id == row.id)
                .values(status=values["status"], prev_hash=values["prev_hash"], record_hash=prev_hash)
            )
        await connection.execute(delete(audit_records).where(audit_records.c.seq > keep))
        await connection.execute(
            update(audit_chain_head)
            .where(audit_chain_head.c.id == HEAD_ROW_ID)
            .values(last_seq=keep, last_hash=prev_hash)
        )


async def test_the_reviewers_forgery_passes_the_chain_but_not_the_checkpoints(
    engine: AsyncEngine, signer: CheckpointSigner
) -> None:
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    for index in range(12):
        await log.append(record(index, status=404 if index == 2 else 200))
    await log.close()
    lines = [await checkpoint_now(engine, signer)]  # signed at seq 12
    await forge(engine, seq=3, status=200, keep=7)
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify()
    assert verdict.ok, verdict.problem  # the chain alone is fooled: that is the point
    assert verdict.head_seq == 7
    assert [row["status"] for row in await _rows(engine)][2] == 200  # the 404, now a 200
    report = await check(engine, lines, signer)
    assert kinds(report) == [(1, "truncated", 12)]
    assert "it now ends at seq 7" in report.problems[0].detail
    assert "restored from a backup older than this checkpoint" in report.problems[0].detail


async def _rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    return [row async for row in AuditLog(engine, TEST_AUDIT_KEYS).iterate()]


async def test_a_rewrite_below_a_checkpoint_reads_as_rewritten(
    engine: AsyncEngine, signer: CheckpointSigner
) -> None:
    await fill(engine, 5)
    at_five = await checkpoint_now(engine, signer)
    await fill(engine, 7)
    at_twelve = await checkpoint_now(engine, signer)
    # Without truncating: every hash from seq 3 on recomputed, the head kept at 12.
    await forge(engine, seq=3, status=201, keep=12)
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).ok
    report = await check(engine, [at_five, at_twelve], signer)
    assert kinds(report) == [(1, "rewritten", 5), (2, "rewritten", 12)]
    assert "the chain was rewritten at or before seq 5" in report.problems[0].detail
    # Truncating below the first checkpoint as well: both contradicted.
    await forge(engine, seq=3, status=202, keep=4)
    report = await check(engine, [at_five, at_twelve], signer)
    assert kinds(report) == [(1, "truncated", 5), (2, "truncated", 12)]


async def test_a_deleted_checkpointed_record_is_reported(
    engine: AsyncEngine, signer: CheckpointSigner
) -> None:
    await fill(engine, 5)
    at_five = await checkpoint_now(engine, signer)
    await fill(engine, 3)
    await execute(engine, "DELETE FROM audit_records WHERE seq = 5")
    report = await check(engine, [at_five], signer)
    assert kinds(report) == [(1, "deleted", 5)]
    assert not (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).ok  # the chain names the gap too


async def test_a_wiped_chain_with_its_anchor_raised_past_every_checkpoint_is_reported(
    engine: AsyncEngine, signer: CheckpointSigner
) -> None:
    """The anchor lives in the unsigned head row: delete everything and raise it to the head, and
    every checkpoint is "before the anchor", so none is compared. That alone is reported."""
    await fill(engine, 6)
    lines = [await checkpoint_now(engine, signer)]
    [last] = [row for row in await _rows(engine) if row["seq"] == 6]
    await execute(engine, "DELETE FROM audit_records")
    await execute(
        engine,
        "UPDATE audit_chain_head SET anchor_seq = 6, anchor_hash = :h, last_seq = 6, last_hash = :h",
        h=last["record_hash"],
    )
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).ok  # nothing left to contradict
    report = await check(engine, lines, signer)
    assert kinds(report) == [(1, "truncated", 6)]
    assert "every checkpoint is at or before the purge anchor" in report.problems[0].detail


# -- purge and restore ------------------------------------------------------------------------------


async def test_checkpoints_at_or_before_the_purge_anchor_are_counted_not_problems(
    engine: AsyncEngine, signer: CheckpointSigner
) -> None:
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    for index in range(8):
        await log.append(record(index, occurred_at=100.0 if index < 5 else time.time()))
    await log.close()
    head = await read_head(engine)
    lines = []
    async with engine.connect() as connection:
        for seq in (3, 5, 8):
            row = (
                await connection.execute(
                    select(audit_records.c.record_hash).where(audit_records.c.seq == seq)
                )
            ).scalar_one()
            lines.append(
                checkpoint_line(
                    make_checkpoint(signer, head._replace(seq=seq, head_hash=row), at=1.0)
                ).decode()
            )
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).purge(older_than=200.0)).anchor_seq == 5
    report = await check(engine, lines, signer)
    assert report.ok, report.problems
    assert (report.checked, report.matched, report.before_anchor, report.anchor_seq) == (3, 1, 2, 5)
    # The checkpoint at the anchor itself is still compared: with the anchor's hash.
    await execute(engine, "UPDATE audit_chain_head SET anchor_hash = :h", h="f" * 64)
    report = await check(engine, lines, signer)
    assert kinds(report) == [(2, "rewritten", 5)]


async def test_a_restore_from_an_older_backup_reads_as_truncation(
    tmp_path: Path, signer: CheckpointSigner
) -> None:
    database = tmp_path / "store.db"
    url = f"sqlite+aiosqlite:///{database}"

    async def session(work: Callable[[AsyncEngine], Any]) -> Any:
        engine = create_engine(url)
        try:
            return await work(engine)
        finally:
            await engine.dispose()  # the last connection folds the WAL into the file

    async def write_and_checkpoint(engine: AsyncEngine) -> str:
        await upgrade_database(engine, keys=TEST_KEYS)
        await fill(engine, 5)
        return await checkpoint_now(engine, signer)

    lines = [await session(write_and_checkpoint)]
    shutil.copyfile(database, tmp_path / "backup.db")  # the nightly backup
    lines.append(await session(write_and_checkpoint))
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(tmp_path / "backup.db", database)  # the restore

    async def verify(engine: AsyncEngine) -> tuple[bool, CheckpointReport]:
        return (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).ok, await check(engine, lines, signer)

    chain_ok, report = await session(verify)
    assert chain_ok  # the restored chain is whole: only the checkpoint after the backup knows more
    assert kinds(report) == [(2, "truncated", 10)]
    assert report.matched == 1


# -- the writer -------------------------------------------------------------------------------------


async def test_the_writer_writes_only_when_the_head_moved_and_its_lines_verify(
    engine: AsyncEngine, signer: CheckpointSigner, tmp_path: Path
) -> None:
    log = LogStream()
    path = tmp_path / "checkpoints.jsonl"
    writer = CheckpointWriter(
        engine, signer, logger=log.logger, path=path, wall_clock=lambda: 1_767_225_600.25
    )
    assert await writer.write_if_moved() is None  # an empty chain: nothing to pin
    await fill(engine, 3)
    first = await writer.write_if_moved()
    assert first is not None
    assert (first["seq"], first["at"], first["key"]) == (3, "2026-01-01T00:00:00.250Z", signer.fingerprint)
    assert await writer.write_if_moved() is None
    await fill(engine, 1)
    second = await writer.write_if_moved()
    assert second is not None
    assert second["seq"] == 4
    await writer.close()  # nothing moved since: nothing more
    file_lines = path.read_text().splitlines()
    assert [json.loads(line) for line in file_lines] == [first, second]
    assert [event["checkpoint"] for event in log.events("audit_checkpoint")] == [first, second]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == CHECKPOINT_FILE_MODE & ~umask
    for lines in (file_lines, log.lines()):  # the file, and the whole log stream
        report = await check(engine, lines, signer)
        assert report.ok, report.problems
        assert report.matched == 2


async def test_the_writer_runs_periodically_and_writes_once_more_on_close(
    engine: AsyncEngine, signer: CheckpointSigner, tmp_path: Path
) -> None:
    log = LogStream()
    path = tmp_path / "checkpoints.jsonl"
    await fill(engine, 2)
    writer = CheckpointWriter(engine, signer, logger=log.logger, interval_seconds=0.05, path=path)
    writer.start()
    await _until(lambda: len(log.events("audit_checkpoint")) == 1)
    await fill(engine, 2)
    await _until(lambda: len(log.events("audit_checkpoint")) == 2)
    await asyncio.sleep(0.2)  # several periods, nothing moved
    assert len(log.events("audit_checkpoint")) == 2
    # A long period: only close can write the records that come now.
    slow = CheckpointWriter(engine, signer, logger=log.logger, interval_seconds=3600, path=path)
    await writer.close()
    slow.start()
    await _until(lambda: len(log.events("audit_checkpoint")) == 3)
    await fill(engine, 1)
    await slow.close()
    seqs = [event["checkpoint"]["seq"] for event in log.events("audit_checkpoint")]
    assert seqs == [2, 4, 4, 5]
    assert (await check(engine, path.read_text().splitlines(), signer)).matched == 4


async def test_the_writer_survives_a_store_outage_and_carries_on(
    engine: AsyncEngine, signer: CheckpointSigner
) -> None:
    log = LogStream()
    await fill(engine, 2)
    await execute(engine, "ALTER TABLE audit_chain_head RENAME TO audit_chain_head_away")
    writer = CheckpointWriter(engine, signer, logger=log.logger, interval_seconds=0.05)
    writer.start()
    await _until(lambda: len(log.events("audit_checkpoint_failed")) >= 2)
    failure = log.events("audit_checkpoint_failed")[0]
    assert failure["stage"] == "store"
    assert failure["level"] == "warning"
    await execute(engine, "ALTER TABLE audit_chain_head_away RENAME TO audit_chain_head")
    await _until(lambda: len(log.events("audit_checkpoint")) == 1)
    await writer.close()
    assert log.events("audit_checkpoint")[0]["checkpoint"]["seq"] == 2


async def test_an_unreachable_database_never_ends_the_writer_or_its_close(signer: CheckpointSigner) -> None:
    log = LogStream()
    gone = create_engine("postgresql+asyncpg://proxy@127.0.0.1:9/proxy")  # nothing listens there
    writer = CheckpointWriter(gone, signer, logger=log.logger, interval_seconds=0.05)
    writer.start()
    await _until(lambda: len(log.events("audit_checkpoint_failed")) >= 2)
    await gone.dispose()
    await writer.close()  # its last attempt fails too, and is logged, not raised
    failures = log.events("audit_checkpoint_failed")
    assert {(event["stage"], event["reason"], event["store_outage"]) for event in failures} == {
        ("store", "ConnectionRefusedError", True)
    }
    assert not log.events("audit_checkpoint")


async def test_a_file_that_cannot_be_written_is_logged_and_the_checkpoint_written_again(
    engine: AsyncEngine, signer: CheckpointSigner, tmp_path: Path
) -> None:
    log = LogStream()
    folder = tmp_path / "not-yet"
    writer = CheckpointWriter(
        engine, signer, logger=log.logger, interval_seconds=0.05, path=folder / "c.jsonl"
    )
    await fill(engine, 3)
    writer.start()
    await _until(lambda: len(log.events("audit_checkpoint_failed")) >= 2)
    assert log.events("audit_checkpoint_failed")[0] | {"timestamp": None} == {
        "event": "audit_checkpoint_failed",
        "stage": "file",
        "reason": "No such file or directory",
        "level": "warning",
        "timestamp": None,
    }
    folder.mkdir()
    await _until(lambda: (folder / "c.jsonl").exists())
    await writer.close()
    assert (await check(engine, (folder / "c.jsonl").read_text().splitlines(), signer)).matched == 1


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- the wiring -------------------------------------------------------------------------------------


async def test_the_running_service_signs_the_last_records_when_it_closes(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    key.write_bytes(new_signing_key_pem())
    path = tmp_path / "checkpoints.jsonl"
    settings = proxy_settings(
        "http://127.0.0.1:9",
        tmp_path / "proxy.db",
        LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE=str(key),
        LIVENESS_PROXY_AUDIT_CHECKPOINT_FILE=str(path),
        LIVENESS_PROXY_AUDIT_CHECKPOINT_SECONDS=0.05,
    )
    log = LogStream()
    async with running_service(
        settings, logger=log.logger, redactor=Redactor(), metrics=ProxyMetrics(), migrate=True
    ) as service:
        await service.audit.append(record(1))
        await _until(lambda: path.exists())
        await service.audit.append(record(2))  # signed by the next period, or else on close
    checkpoints = [json.loads(line) for line in path.read_text().splitlines()]
    assert [checkpoint["seq"] for checkpoint in checkpoints] == [1, 2]
    engine = create_engine(settings.database_url)
    try:
        report = await check(engine, path.read_text().splitlines(), CheckpointSigner.from_file(key))
        assert report.ok, report.problems
        assert report.latest is not None
        assert report.latest.seq == (await read_head(engine)).seq == 2
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT count(*) FROM audit_records"))).scalar_one() == 2
    finally:
        await engine.dispose()

"""Audit appends per second: group commit vs one commit per append, on SQLite (a temporary file).

    .venv/bin/python bench/audit_appends.py [--concurrency 1,16,64,256] [--seconds 2]
                                            [--synchronous normal,full] [--loop asyncio]

N tasks append records as fast as `AuditLog.append` returns, for a fixed time each. "group" is the
AuditLog as the proxy runs it (batch_max 256); "single" is the same AuditLog with batch_max=1: one
transaction (head lock, insert, commit) per record, which is what every append cost before group
commit. Both write the full hash chain. `--synchronous full` measures the cost of an fsync per commit
(the engine's default, WAL + synchronous=FULL) against NORMAL. "CPU µs" is the process's CPU time
(all threads) per append: the part of an append that competes with request handling.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.pool import ConnectionPoolEntry

from liveness_proxy.store import AuditLog, AuditRecord, create_engine, upgrade_database
from liveness_proxy.store.audit_chain import parse_audit_keys
from liveness_proxy.store.database import MigrationKeys
from liveness_proxy.store.subjects import SubjectKeys, commit

_BENCH_PEPPER = "bench-pepper-" + "b" * 40
BENCH_KEYS = MigrationKeys(
    audit=parse_audit_keys("", pepper=_BENCH_PEPPER),
    subjects=SubjectKeys.from_settings_values(pepper=_BENCH_PEPPER, subject_key=""),
)
BENCH_AUDIT_KEYS = BENCH_KEYS.audit
# A record naming a subject carries its commitment (store/subjects.py); any secret does here.
_SUBJECT_COMMITMENT = commit(b"b" * 32, "subject", "bench")


@dataclass
class Run:
    mode: str
    synchronous: str
    concurrency: int
    appends: int
    seconds: float
    commits: int
    p99_ms: float
    cpu_seconds: float

    @property
    def cpu_us_per_append(self) -> float:
        return self.cpu_seconds / max(self.appends, 1) * 1e6

    @property
    def per_second(self) -> float:
        return self.appends / self.seconds


def _record(worker: int, index: int) -> AuditRecord:
    return AuditRecord(
        occurred_at=time.time(),
        request_id=f"bench-{worker}-{index}",
        subject="bench",
        credential_id="key:0123456789abcdef",
        action="result.read",
        session_id="s-0123456789",
        status=200,
        upstream_status=200,
        latency_ms=1.234,
        problem=None,
        subject_commitment=_SUBJECT_COMMITMENT,
    )


async def measure(directory: Path, *, mode: str, synchronous: str, concurrency: int, seconds: float) -> Run:
    path = directory / f"{mode}-{synchronous}-{concurrency}.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    pragma = f"PRAGMA synchronous={synchronous.upper()}"

    def set_synchronous(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Runs after the engine's own connect hook (registered first), so it wins.
        cursor = dbapi_connection.cursor()
        cursor.execute(pragma)
        cursor.close()

    event.listen(engine.sync_engine, "connect", set_synchronous)
    await upgrade_database(engine, keys=BENCH_KEYS)
    commits = 0

    def on_commit(_size: int, _seconds: float) -> None:
        nonlocal commits
        commits += 1

    log = AuditLog(engine, BENCH_AUDIT_KEYS, batch_max=256 if mode == "group" else 1, on_commit=on_commit)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def appender(worker: int) -> int:
        done = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await log.append(_record(worker, done))
            latencies.append(time.perf_counter() - started)
            done += 1
        return done

    await log.append(_record(-1, 0))  # writer started, file warmed up
    started = time.perf_counter()
    # The process's CPU, aiosqlite's thread (SQLite's own work) included: what an append costs the
    # machine, which the throughput hides while the commits wait for fsync.
    cpu_started = time.process_time()
    counts = await asyncio.gather(*(appender(worker) for worker in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    await log.close()
    verdict = await log.verify()
    assert verdict.ok, verdict.problem
    await engine.dispose()
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 100 else max(latencies)
    return Run(mode, synchronous, concurrency, sum(counts), elapsed, commits - 1, p99 * 1000, cpu)


async def run_all(levels: list[int], syncs: list[str], seconds: float) -> None:
    print(f"event loop: {type(asyncio.get_running_loop()).__module__}; SQLite via aiosqlite, WAL")
    print(
        f"{'sync':<7} {'N':>4} {'group/s':>9} {'records/commit':>15} {'p99 ms':>8} {'CPU µs':>7} "
        f"{'single/s':>9} {'p99 ms':>8} {'CPU µs':>7} {'ratio':>6}"
    )
    with tempfile.TemporaryDirectory() as folder:
        for synchronous in syncs:
            for level in levels:
                group = await measure(
                    Path(folder), mode="group", synchronous=synchronous, concurrency=level, seconds=seconds
                )
                single = await measure(
                    Path(folder), mode="single", synchronous=synchronous, concurrency=level, seconds=seconds
                )
                print(
                    f"{synchronous:<7} {level:>4} {group.per_second:>9.0f} "
                    f"{group.appends / max(group.commits, 1):>15.1f} "
                    f"{group.p99_ms:>8.1f} {group.cpu_us_per_append:>7.1f} "
                    f"{single.per_second:>9.0f} {single.p99_ms:>8.1f} {single.cpu_us_per_append:>7.1f} "
                    f"{group.per_second / single.per_second:>5.1f}x"
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", default="1,16,64,256", help="comma-separated appender counts")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each run")
    parser.add_argument("--synchronous", default="full,normal", help="comma-separated: normal, full")
    parser.add_argument(
        "--loop", choices=["uvloop", "asyncio"], default="uvloop", help="uvloop is what serve runs"
    )
    args = parser.parse_args()
    work = run_all(
        [int(level) for level in args.concurrency.split(",")],
        [mode.strip().lower() for mode in args.synchronous.split(",")],
        args.seconds,
    )
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(work)
    else:
        asyncio.run(work)


if __name__ == "__main__":
    main()

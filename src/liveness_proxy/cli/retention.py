"""`retention run`: one retention sweep now, for deployments that schedule it themselves (cron) or
want it at once after changing a retention setting. The running proxies sweep on their own too;
the two can overlap safely (store/retention.py: each row is taken by one of them)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import time

import orjson

from liveness_proxy.cli.audit import current_schema_database
from liveness_proxy.settings import Settings
from liveness_proxy.store.retention import Retention, RetentionResult
from liveness_proxy.wiring.options import retention_options
from liveness_proxy.wiring.parts import privacy_keys


def cmd_retention_run(args: argparse.Namespace) -> int:
    settings = Settings.load()
    keys = privacy_keys(settings)
    policy = retention_options(settings).policy

    async def run() -> RetentionResult:
        async with current_schema_database(settings) as engine:
            retention = Retention(engine, keys.audit, policy=policy, wall_clock=time.time)
            return await retention.run(request_id="cli-retention")

    result = asyncio.run(run())
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result.as_dict()) + b"\n")
        return 0
    removed = ", ".join(
        f"{name.replace('_', ' ')}: {count}" for name, count in result.counts.as_dict().items()
    )
    print(f"retention applied: {removed}")
    cutoffs = result.cutoffs
    print(f"sessions, verdicts and webhook events created before: {_when(cutoffs.sessions)}")
    print(f"plain values of audit records that occurred before: {_when(cutoffs.audit_plaintext)}")
    return 0


def _when(instant: float | None) -> str:
    if instant is None:
        return "kept (0 days)"
    return datetime.datetime.fromtimestamp(instant, tz=datetime.UTC).isoformat(timespec="seconds")

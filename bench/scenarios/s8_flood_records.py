"""S8's database side: the rows of S8's proxy, counted per table and per audit action before the first
window and after the proxy has stopped, and the bound the floods' rows must respect.

Failed authentications are audited in aggregate (src/liveness_proxy/store/failed_authentications.py):
per window of AGGREGATE_WINDOW_SECONDS of wall-clock time and per process, at most
AGGREGATE_MAX_ADDRESSES `auth.failed` records (one per credential kind and client address) and one
`auth.failed.overflow` record. A window's records are written when it ends, or at shutdown for the
window in progress: hence the count after the proxy has stopped. The authenticated traffic writes its
one audit record per request (`result.read`), as in S1; those rows are counted apart.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

AGGREGATE_WINDOW_SECONDS = 60
AGGREGATE_MAX_ADDRESSES = 100
FLOOD_ACTIONS = ("auth.failed", "auth.failed.overflow")
# A request the proxy read before wrk stopped may still be answered, and counted in its window, a
# moment after: a flood's span is taken to end this much later.
IN_FLIGHT_SECONDS = 1.0


def table_rows(database: Path) -> dict[str, Any]:
    """Rows per table, audit records per action, and the failures the floods' records count."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        tables = [
            name
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        # The names come from sqlite_master itself, quoted: nothing outside the database reaches SQL.
        counts = {name: int(db.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]) for name in tables}
        actions = {
            str(action): int(count)
            for action, count in db.execute("SELECT action, count(*) FROM audit_records GROUP BY action")
        }
        details = [
            json.loads(detail)
            for (detail,) in db.execute(
                "SELECT detail FROM audit_records WHERE action IN (?, ?)", FLOOD_ACTIONS
            )
        ]
    return {
        "tables": counts,
        "audit_actions": actions,
        "failures_recorded": sum(int(detail["failures"]) for detail in details),
        "refused_by_limit_recorded": sum(int(detail["refused_by_limit"]) for detail in details),
    }


def windows_touched(spans: Sequence[tuple[float, float]]) -> int:
    """The distinct aggregation windows (of wall-clock time, as the proxy counts them) that any of
    the (start, end) spans ran in."""
    windows: set[int] = set()
    for started_at, ended_at in spans:
        first = math.floor(started_at / AGGREGATE_WINDOW_SECONDS)
        last = math.floor((ended_at + IN_FLIGHT_SECONDS) / AGGREGATE_WINDOW_SECONDS)
        windows.update(range(first, last + 1))
    return len(windows)


def _gained(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {name: after.get(name, 0) - before.get(name, 0) for name in sorted(set(before) | set(after))}


def records_section(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    *,
    flood_spans: Sequence[tuple[float, float]],
    flood_sent: int,
    flood_answered: int,
    proxy_exit_code: int | None,
) -> dict[str, Any]:
    """The JSON section: rows gained per table and per audit action, the floods' rows and their
    bound, and the failures the floods' records count against the requests the floods sent."""
    actions = _gained(before["audit_actions"], after["audit_actions"])
    rows = _gained(before["tables"], after["tables"])
    flood_rows = sum(actions.get(action, 0) for action in FLOOD_ACTIONS)
    windows = windows_touched(flood_spans)
    return {
        "note": (
            "rows counted per table before the first window and after the proxy stopped (its "
            "shutdown writes the aggregate window in progress); the floods' rows are the auth.failed "
            "and auth.failed.overflow records; the authenticated traffic's are its one audit record "
            "per request (result.read, as in S1) and the session's verdict, recorded once"
        ),
        "rows_gained": rows,
        "audit_actions_gained": actions,
        "flood_rows": flood_rows,
        "authenticated_traffic_rows": sum(rows.values()) - flood_rows,
        "windows_touched": windows,
        "window_seconds": AGGREGATE_WINDOW_SECONDS,
        "processes": 1,
        "bound": windows * (AGGREGATE_MAX_ADDRESSES + 1),
        "bound_rule": f"windows x ({AGGREGATE_MAX_ADDRESSES} + 1) per process",
        "flood_requests_sent": flood_sent,
        "flood_requests_answered": flood_answered,
        "failures_recorded": after["failures_recorded"] - before["failures_recorded"],
        "refused_by_limit_recorded": after["refused_by_limit_recorded"] - before["refused_by_limit_recorded"],
        "proxy_exit_code": proxy_exit_code,
    }

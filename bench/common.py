"""What every part of the benchmark harness shares: where things are, the API paths the scenarios
request, the one error a run stops on, and progress lines on stderr.

The harness runs as `python bench/run.py`, so bench/ (the script's directory) is on sys.path and its
modules import each other by plain name (`from common import ...`, `from scenarios.s4_token_stampede
import ...`); bench/ itself is not a package. None of them is named like a standard-library module
(no `statistics.py`, no `profile.py`): from bench/ on sys.path it would shadow that module for every
module in the process (bench/audit_appends.py, for one, imports the standard `statistics`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
COMMAND = str(Path(sys.executable).parent / "liveness-proxy")
PY_SPY = str(Path(sys.executable).parent / "py-spy")

RESULT_PATH = "/v1/liveness/sessions/{session_id}/result"
SESSIONS_PATH = "/v1/liveness/sessions"
SESSION_TOKEN_PATH = "/v1/liveness/session-token"
STUB_RESULT_PATH = "/service/liveness-v2/liveness_result/{session_id}"


class BenchError(Exception):
    """A run that cannot go on: the message says what failed (and shows the process's log tail)."""


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

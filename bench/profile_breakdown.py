"""A py-spy profile (raw, collapsed stacks) split into the components docs/performance.md reports:
the HTTP server, the framework, the upstream exchange, the audit record and so on.

    .venv/bin/python bench/profile_breakdown.py PROFILE.txt [--cpu-us-per-request 210]

Each sample goes to one component: the innermost frame of the stack whose file belongs to a
component decides. Library frames that any layer calls (asyncio, SQLAlchemy, hmac, the stdlib) do not
decide on their own: a SQLAlchemy frame under the audit writer counts as the audit record, under the
session binding as the store. A stack with no deciding frame at all is the event loop's. With the CPU
time per request measured in the same run, each share becomes microseconds.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# (component, file patterns), most specific first: the first pattern that matches a frame's file wins.
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tracing", ("liveness_proxy/tracing/", "opentelemetry/")),
    ("audit record (chain, group commit)", ("store/audit", "store/group_commit.py", "api/audit_policy.py")),
    (
        "result reads (single flight, stored results)",
        ("api/result_reads.py", "api/final_results.py", "upstream/single_flight.py"),
    ),
    ("store reads (ownership, verdicts)", ("liveness_proxy/store/",)),
    ("upstream exchange (client, parsing, timeouts)", ("liveness_proxy/http/", "liveness_proxy/upstream/")),
    ("access log", ("observability.py", "structlog/")),
    ("metrics", ("liveness_proxy/metrics.py", "prometheus_client/")),
    ("rate limits", ("liveness_proxy/ratelimit/", "limits/")),
    ("caller authentication", ("liveness_proxy/auth/",)),
    (
        "result handling (minimisation, verdict, JSON)",
        ("api/handlers.py", "api/declared.py", "api/bodies.py", "liveness_proxy/privacy.py", "orjson"),
    ),
    (
        "framework: routing, middleware, responses",
        (
            "starlette/",
            "api/routes.py",
            "api/responses.py",
            "api/asgi.py",
            "liveness_proxy/app.py",
            "liveness_proxy/middleware.py",
            "liveness_proxy/browser.py",
            "liveness_proxy/errors.py",
        ),
    ),
    ("HTTP server (uvicorn, httptools, socket writes)", ("uvicorn/", "httptools", "liveness_proxy/serving/")),
)
EVENT_LOOP = "event loop and other"
_LOOP_FRAME = "Runner.run (asyncio/runners.py"
_FRAME = re.compile(r"\(([^():]+)(?::\d+)?\)$")


def component_of(stack: str) -> str:
    frames = stack.split(";")
    # What runs under the event loop's own frame (`Runner.run`: uvloop's C loop, epoll) are its
    # callbacks; the frames above it (the CLI, uvicorn's `Server.run`) decide nothing.
    loop_frames = [index for index, frame in enumerate(frames) if frame.startswith(_LOOP_FRAME)]
    if loop_frames:
        frames = frames[loop_frames[-1] + 1 :]
    for frame in reversed(frames):
        match = _FRAME.search(frame)
        if match is None:
            continue
        path = match.group(1)
        for name, patterns in COMPONENTS:
            if any(pattern in path for pattern in patterns):
                return name
    return EVENT_LOOP


def breakdown(raw: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[component_of(stack)] += int(count)
    return counts


def render(counts: Counter[str], cpu_us_per_request: float | None) -> str:
    total = sum(counts.values())
    lines = ["| component | share | µs per request |", "| --- | --- | --- |"]
    for name, count in counts.most_common():
        share = count / total if total else 0.0
        micros = f"{share * cpu_us_per_request:.0f}" if cpu_us_per_request else "-"
        lines.append(f"| {name} | {share:.1%} | {micros} |")
    lines.append(f"| all ({total} samples) | 100% | {cpu_us_per_request or '-'} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("profile", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--cpu-us-per-request", type=float, default=None)
    args = parser.parse_args(argv)
    print(render(breakdown(args.profile.read_text()), args.cpu_us_per_request))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Reports: the machine a run measured on, the Markdown summary table, the chart of S1-S3, and
`--update-docs` (docs/performance.md between its markers, and docs/performance.png).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common import PY_SPY, REPO_DIR, progress
from stats import Row
from stubs import nginx_binary

DOCS_START_MARKER = "<!-- bench:results:start -->"
DOCS_END_MARKER = "<!-- bench:results:end -->"


def machine_info() -> dict[str, Any]:
    def first_line(command: Sequence[str]) -> str:
        with contextlib.suppress(OSError):
            answer = subprocess.run(list(command), capture_output=True, text=True, check=False)
            return (
                (answer.stdout + answer.stderr).strip().splitlines()[0]
                if (answer.stdout + answer.stderr).strip()
                else ""
            )
        return "not found"

    def git(*args: str) -> str:
        with contextlib.suppress(OSError):
            answer = subprocess.run(
                ["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True, check=False
            )
            return answer.stdout.strip()
        return ""

    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nginx": first_line([nginx_binary(), "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "py_spy": first_line([PY_SPY, "--version"]),
        "load_average_at_start": list(os.getloadavg()),
        "git_commit": git("rev-parse", "HEAD"),
        # The code measured: uncommitted changes under src/ are part of it.
        "src_uncommitted_changes": bool(git("status", "--porcelain", "--", "src")),
    }


def markdown_table(rows: Sequence[Row]) -> str:
    header = "| scenario | ours median (min-max) | reference(s) | ratio | target | met? |\n"
    header += "| --- | --- | --- | --- | --- | --- |\n"
    return header + "".join(f"| {' | '.join(row)} |\n" for row in rows)


def render_chart(scenarios: Mapping[str, Any], path: Path) -> None:
    """Grouped bars (ours, nginx, naive) for S1-S3: req/s on a log axis (nginx is ~100x naive),
    and p99 latency; error bars span min to max over the repetitions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = (
        ("ours", "our proxy", "#1f77b4"),
        ("nginx", "nginx proxy", "#2ca02c"),
        ("naive", "naive proxy", "#d62728"),
    )
    labels = {"S1": "S1 result read", "S2": "S2 create session", "S3": "S3 slow upstream"}
    groups = [name for name in ("S1", "S2", "S3") if name in scenarios]
    figure, (rate_axis, latency_axis) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.26
    for offset, (system, label, color) in enumerate(systems):
        for axis, figure_name in ((rate_axis, "requests_per_second"), (latency_axis, "p99_ms")):
            xs, medians, below, above = [], [], [], []
            for index, group in enumerate(groups):
                measured = scenarios[group]["measured"].get(system)
                if measured is None:
                    continue
                values = measured[figure_name]
                x = index + (offset - 1) * width
                if values["median"] <= 0:
                    # wrk reports no latency when (nearly) every request failed: say so, no bar.
                    axis.text(
                        x, 0.03, "failed", rotation=90, ha="center", va="bottom", color=color,
                        transform=axis.get_xaxis_transform(),
                    )  # fmt: skip
                    continue
                xs.append(x)
                medians.append(values["median"])
                below.append(values["median"] - values["min"])
                above.append(values["max"] - values["median"])
            axis.bar(xs, medians, width, yerr=[below, above], capsize=3, label=label, color=color)
    for axis, title, unit in ((rate_axis, "throughput", "requests/s"), (latency_axis, "p99 latency", "ms")):
        axis.set_xticks(range(len(groups)), [labels[group] for group in groups])
        axis.set_yscale("log", nonpositive="clip")
        axis.set_ylabel(f"{unit} (log scale)")
        axis.set_title(f"{title}: median, min-max over repetitions")
        axis.grid(axis="y", which="both", alpha=0.3)
    rate_axis.legend()
    if not groups:
        rate_axis.text(
            0.5, 0.5, "no throughput scenario in this run", ha="center", transform=rate_axis.transAxes
        )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def update_docs(table: str, chart: Path) -> None:
    """docs/performance.md between the markers gets the table, docs/performance.png the chart;
    nothing in docs/ is touched unless both markers are there."""
    document = REPO_DIR / "docs" / "performance.md"
    text = document.read_text() if document.exists() else ""
    start, end = text.find(DOCS_START_MARKER), text.find(DOCS_END_MARKER)
    if start < 0 or end < start:
        progress(f"--update-docs: {document} has no {DOCS_START_MARKER} … {DOCS_END_MARKER}; docs left alone")
        return
    head = text[: start + len(DOCS_START_MARKER)]
    document.write_text(f"{head}\n{table}{text[end:]}")
    shutil.copyfile(chart, REPO_DIR / "docs" / "performance.png")
    progress(f"--update-docs: wrote {document} and docs/performance.png")

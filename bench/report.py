"""Reports: the machine a run measured on, the Markdown summary table, the chart (S0-S3), and
`--update-docs` (docs/performance.md and README.md between their markers, and docs/performance.png).
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


# The throughput scenarios in the chart, with their labels; S0 (latency added) has a panel of its own.
CHART_GROUPS = {
    "S1": "S1 read\n(pending, uncached)",
    "S1-final": "S1-final\n(terminal)",
    "S1-herd": "S1-herd\n(one session)",
    "S2": "S2 create",
    "S3": "S3 500 ms\nupstream, c1000",
}
CHART_SYSTEMS = (
    ("ours", "our proxy", "#1f77b4"),
    ("nginx", "nginx proxy", "#2ca02c"),
    ("naive", "naive proxy", "#d62728"),
)


def render_chart(scenarios: Mapping[str, Any], path: Path) -> None:
    """Grouped bars (ours, nginx, naive) for S1, S1-final, S1-herd, S2 and S3: req/s on a log axis
    (nginx is ~100x naive) and p99 latency; error bars span min to max over the repetitions. A third
    panel: S0, the latency each proxy adds at one connection (p50 and p99 less the stub direct's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [name for name in CHART_GROUPS if name in scenarios]
    figure, (rate_axis, latency_axis, added_axis) = plt.subplots(
        1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [5, 5, 2.2]}
    )
    width = 0.26
    for offset, (system, label, color) in enumerate(CHART_SYSTEMS):
        for axis, figure_name in ((rate_axis, "requests_per_second"), (latency_axis, "p99_ms")):
            _bars(axis, scenarios, groups, system, figure_name, (offset - 1) * width, width, label, color)
    for axis, title, unit in ((rate_axis, "throughput", "requests/s"), (latency_axis, "p99 latency", "ms")):
        axis.set_xticks(range(len(groups)), [CHART_GROUPS[group] for group in groups], fontsize=8)
        axis.set_yscale("log", nonpositive="clip")
        axis.set_ylabel(f"{unit} (log scale)")
        axis.set_title(f"{title}: median, min-max over repetitions")
        axis.grid(axis="y", which="both", alpha=0.3)
    rate_axis.legend(fontsize=8)
    if not groups:
        rate_axis.text(
            0.5, 0.5, "no throughput scenario in this run", ha="center", transform=rate_axis.transAxes
        )
    _added_latency_panel(added_axis, scenarios.get("S0"))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _bars(
    axis: Any,
    scenarios: Mapping[str, Any],
    groups: Sequence[str],
    system: str,
    figure_name: str,
    shift: float,
    width: float,
    label: str,
    color: str,
) -> None:
    xs, medians, below, above = [], [], [], []
    for index, group in enumerate(groups):
        measured = scenarios[group]["measured"].get(system)
        if measured is None:
            continue
        values = measured[figure_name]
        x = index + shift
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


def _added_latency_panel(axis: Any, s0: Mapping[str, Any] | None) -> None:
    """S0: microseconds each proxy adds to the stub direct's p50 and p99, at one connection."""
    axis.set_title("S0: latency added at c1")
    if s0 is None:
        axis.text(0.5, 0.5, "S0 not in this run", ha="center", transform=axis.transAxes)
        axis.set_xticks([])
        return
    added = s0["added_latency_us"]
    width = 0.38
    for offset, (system, label, color) in enumerate(CHART_SYSTEMS[:2]):
        values = [added[system]["p50_us"], added[system]["p99_us"]]
        bars = axis.bar(
            [index + (offset - 0.5) * width for index in range(2)], values, width, label=label, color=color
        )
        axis.bar_label(bars, [f"{value:,.0f}" for value in values], fontsize=7)
    axis.set_xticks(range(2), ["p50", "p99"])
    axis.set_ylabel("µs added (less the stub direct's)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)


# Where --update-docs writes the table, between the markers: the performance page and the README's
# performance section. The chart goes to docs/performance.png, which both show.
DOCUMENTS_WITH_RESULTS = ("docs/performance.md", "README.md")


def update_docs(table: str, chart: Path) -> None:
    """Each of DOCUMENTS_WITH_RESULTS gets the table between its markers, docs/performance.png the
    chart; a document without both markers is left alone, and so is the chart if none has them."""
    written = []
    for relative in DOCUMENTS_WITH_RESULTS:
        document = REPO_DIR / relative
        text = document.read_text() if document.exists() else ""
        start, end = text.find(DOCS_START_MARKER), text.find(DOCS_END_MARKER)
        if start < 0 or end < start:
            progress(f"--update-docs: {document} has no {DOCS_START_MARKER} … {DOCS_END_MARKER}; left alone")
            continue
        head = text[: start + len(DOCS_START_MARKER)]
        document.write_text(f"{head}\n{table}{text[end:]}")
        written.append(relative)
    if written:
        shutil.copyfile(chart, REPO_DIR / "docs" / "performance.png")
        progress(f"--update-docs: wrote {', '.join(written)} and docs/performance.png")

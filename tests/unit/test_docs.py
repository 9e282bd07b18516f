"""The README stays true: every setting documented, the Quickstart is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from liveness_proxy.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_in_the_readme_table() -> None:
    for name in Settings.model_fields:
        if name.endswith("_file"):
            continue
        assert f"| `{name.upper()}" in README, f"{name.upper()} is not documented in README.md"


def test_quickstart_has_two_commands_and_ci_runs_the_test_one() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(make \w+)", quickstart.split("```sh", 1)[1].split("```", 1)[0], re.MULTILINE)
    assert commands == ["make demo", "make test"]
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci_script, re.MULTILINE)

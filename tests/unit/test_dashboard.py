"""deploy/grafana/liveness-proxy.json is importable as it stands: one Prometheus data source variable
that every panel and query names, unique panel ids, a query in every panel, a layout without
overlaps. (That every metric it queries exists: integration/test_operations_rules.py, against a
live scrape; that every query parses: the same module, with promtool.)"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "liveness-proxy.json"
DATASOURCE_VARIABLE = "DS_PROMETHEUS"
DATASOURCE_REF = {"type": "prometheus", "uid": "${" + DATASOURCE_VARIABLE + "}"}
GRID_COLUMNS = 24
# What the issue asks the dashboard to show, as words that must appear in some panel's title.
REQUIRED_TOPICS = (
    "request rate",
    "errors",
    "latency",
    "upstream calls",
    "upstream latency",
    "circuit",
    "token refreshes",
    "rate-limited",
    "daily attempts",
    "audit commit latency",
    "finalizer backlog",
    "webhook attempts",
    "jobs by kind and state",
    "webhook endpoint",
)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels() -> list[dict[str, Any]]:
    """Every panel, rows' collapsed children included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def query_panels() -> list[dict[str, Any]]:
    return [panel for panel in panels() if panel["type"] != "row"]


def test_the_dashboard_is_a_current_schema_with_a_title_and_uid() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert board["title"]
    assert board["uid"] == "liveness-proxy"
    # Importable as is: no __inputs to fill in, the data source is chosen with the variable.
    assert "__inputs" not in board


def test_the_data_source_is_a_prometheus_template_variable() -> None:
    variables = {variable["name"]: variable for variable in dashboard()["templating"]["list"]}
    source = variables[DATASOURCE_VARIABLE]
    assert source["type"] == "datasource"
    assert source["query"] == "prometheus"
    # The other variables query through it too.
    for name, variable in variables.items():
        if name != DATASOURCE_VARIABLE:
            assert variable["datasource"] == DATASOURCE_REF, name


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in panels()]
    assert all(isinstance(panel_id, int) for panel_id in ids)
    assert len(ids) == len(set(ids))


def test_every_panel_and_every_query_uses_the_data_source_variable() -> None:
    for panel in query_panels():
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE_REF) == DATASOURCE_REF, panel["title"]


def test_every_panel_has_a_title_a_description_and_queries_with_an_expression() -> None:
    for panel in query_panels():
        assert panel["title"], panel["id"]
        assert panel["description"], panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert all(target["expr"].strip() for target in targets), panel["title"]
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_rows_are_layout_only() -> None:
    for panel in panels():
        if panel["type"] == "row":
            assert "targets" not in panel
            assert panel["gridPos"]["w"] == GRID_COLUMNS


def test_every_panel_is_placed_inside_the_grid_without_overlapping_another() -> None:
    placed = []
    for panel in panels():
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys(), panel["title"]
        assert grid["h"] > 0, panel["title"]
        assert grid["w"] > 0, panel["title"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        placed.append((panel["title"], grid))
    for (first, a), (second, b) in combinations(placed, 2):
        apart = (
            a["x"] + a["w"] <= b["x"]
            or b["x"] + b["w"] <= a["x"]
            or a["y"] + a["h"] <= b["y"]
            or b["y"] + b["h"] <= a["y"]
        )
        assert apart, f"{first!r} overlaps {second!r}"


def test_every_query_is_filtered_by_the_job_and_instance_variables() -> None:
    for panel in query_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            selectors = expr.count("liveness_proxy_")
            assert expr.count('job=~"$job"') == selectors, (panel["title"], expr)
            assert expr.count('instance=~"$instance"') == selectors, (panel["title"], expr)


@pytest.mark.parametrize("topic", REQUIRED_TOPICS)
def test_the_dashboard_shows_what_the_issue_asks_for(topic: str) -> None:
    assert any(topic in panel["title"].lower() for panel in query_panels()), topic

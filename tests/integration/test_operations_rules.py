"""The alert rules and the dashboard against the real thing: promtool checks the rules and runs their
unit tests (tests/prometheus/alerts_test.yml), every query of the dashboard parses as PromQL, every
metric the dashboard or an alert names is exposed by a running proxy, every alert has its runbook
section, and the one signal added for an alert (audit records the store could not take) counts.

promtool comes from Debian's `prometheus` package. Without it these tests skip, unless
LIVENESS_PROXY_TEST_REQUIRE_SERVICES=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from services import REQUIRE_SERVICES
from support import ProxyHarness

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "liveness-proxy.json"
OPERATIONS = ROOT / "docs" / "operations.md"

METRIC_NAME = re.compile(r"\bliveness_proxy_[a-z0-9_]+")
# The sample names a family of each type exposes, from its `# TYPE` name (a counter's TYPE name
# ends in _total in the classic text format, not in OpenMetrics).
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}
# Grafana's variables, replaced by what they stand for so that promtool can parse the queries.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$instance": ".*",
}
SEVERITIES = {"critical", "warning"}
# What Prometheus 2.x sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
SESSION_TOKEN = "/v1/liveness/session-token"


# -- helpers -------------------------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed (Debian package `prometheus`): the alert rules were not checked."
        if REQUIRE_SERVICES:
            pytest.fail(message + " LIVENESS_PROXY_TEST_REQUIRE_SERVICES=1: failing instead of skipping.")
        pytest.skip(message)
    return found


def run_promtool(*arguments: str | Path, cwd: Path = ROOT) -> str:
    result = subprocess.run(
        [promtool(), *map(str, arguments)], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' and its variables' queries."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries: list[str] = []
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            queries.extend(target["expr"] for target in inner.get("targets", []))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def exposed_sample_names(exposition: str) -> set[str]:
    """The sample names a scrape can show, from its `# TYPE` lines (a family with labels shows its
    TYPE line before its first series, so a family is exposed even before its first event)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(maxsplit=3)
        family = name.removesuffix("_total") if kind == "counter" else name
        names.update(family + suffix for suffix in SAMPLE_SUFFIXES.get(kind, ("",)))
    return names


def metric_value(client: httpx.Client, name: str) -> float:
    for family in parse_text(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} is not on /metrics")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


@contextmanager
def write_locked(database_path: str) -> Iterator[None]:
    """Another connection holds SQLite's write lock for the block (readers go on: WAL)."""
    locker = sqlite3.connect(database_path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        locker.close()  # rolls the transaction back


# -- the alert rules ----------------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules() -> None:
    output = run_promtool("check", "rules", ALERTS)
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_the_unit_tests_of_the_alert_rules_pass() -> None:
    # Paths in the test file are relative to it; promtool is run from the repository root.
    output = run_promtool("test", "rules", ALERT_TESTS.relative_to(ROOT))
    assert "SUCCESS" in output


def test_every_alert_is_tested_firing_and_quiet() -> None:
    document = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in document["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names == firing
    assert names == quiet


def test_the_alerts_the_issue_asks_for_are_there() -> None:
    assert {rule["alert"] for rule in alert_rules()} == {
        "LivenessProxyUpstreamErrorRatioHigh",
        "LivenessProxyCircuitOpen",
        "LivenessProxyNoUpstreamToken",
        "LivenessProxyAuditStoreUnavailable",
        "LivenessProxyFinalizerBacklogGrowing",
        "LivenessProxyWebhooksDeadLettered",
        "LivenessProxyDailyCapsHitOften",
    }


def test_every_alert_has_a_severity_a_summary_a_description_and_its_runbook_section() -> None:
    headings = [line.lstrip("#").strip() for line in OPERATIONS.read_text(encoding="utf-8").splitlines()]
    anchors = {github_anchor(heading): heading for heading in headings if heading}
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert annotations["description"].strip(), name
        document, _, anchor = annotations["runbook_url"].partition("#")
        assert document == "docs/operations.md", name
        assert anchors.get(anchor) == name, f"{name}: no heading `{name}` in docs/operations.md"


# -- the dashboard's queries --------------------------------------------------------------------------


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool has no offline query parser of its own: each query becomes a recording rule.
    rules = []
    for number, query in enumerate(dashboard_queries()):
        expr = query
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        if expr.startswith("label_values("):  # Grafana's own function: its argument is a selector
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    assert f"SUCCESS: {len(rules)} rules found" in run_promtool("check", "rules", path)


# -- against a running proxy ---------------------------------------------------------------------------


def test_every_metric_of_the_dashboard_and_the_alerts_is_exposed_by_a_running_proxy(
    make_proxy: MakeProxy,
) -> None:
    used = {
        source: {name for expr in exprs for name in METRIC_NAME.findall(expr)}
        for source, exprs in {
            "dashboard": dashboard_queries(),
            "alerts": [rule["expr"] for rule in alert_rules()],
        }.items()
    }
    assert used["dashboard"]
    assert used["alerts"]
    with (
        make_proxy(proxy_overrides={"LIVENESS_PROXY_RATE_LIMIT_RESULT": "1/minute"}) as proxy,
        proxy.client() as client,
    ):
        session_id = proxy.create_session(client)
        result = f"/v1/liveness/sessions/{session_id}/result"
        assert client.get(result, headers=proxy.auth()).status_code == 200
        assert client.get(result, headers=proxy.auth()).status_code == 429
        assert client.get(result).status_code == 401
        assert client.get("/readyz").status_code == 200
        plain = client.get("/metrics")
        openmetrics = client.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    # Both parse as their format says.
    assert list(parse_text(plain.text))
    assert list(parse_openmetrics(openmetrics.text))  # type: ignore[no-untyped-call]  # untyped upstream
    for scrape in (plain.text, openmetrics.text):
        exposed = exposed_sample_names(scrape)
        for source, names in used.items():
            assert names - exposed == set(), f"{source} uses metrics a running proxy does not expose"
    # Not only declared: the requests above were counted under the names the dashboard reads.
    result_route = "/v1/liveness/sessions/{session_id}/result"
    assert (
        f'liveness_proxy_http_requests_total{{method="GET",route="{result_route}",status="429"}} 1.0'
        in plain.text
    )
    assert 'liveness_proxy_rate_limited_requests_total{limit="result"} 1.0' in plain.text
    assert "liveness_proxy_upstream_request_duration_seconds_bucket{" in plain.text


@pytest.mark.slow
def test_requests_whose_audit_record_the_store_cannot_take_are_counted(make_proxy: MakeProxy) -> None:
    # What LivenessProxyAuditStoreUnavailable reads. SQLite's write lock, held by another connection,
    # makes the audit commit give up after its busy timeout (5 s), as an unreachable store would.
    overrides = {"LIVENESS_PROXY_SESSION_TOKEN_BINDING": "false"}  # else the binding meets the lock first
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
        assert metric_value(client, "liveness_proxy_audit_unavailable_total") == 0
        with write_locked(proxy.settings.database_url.split("///", 1)[1]):
            # An answer the store cannot record is withheld...
            withheld = client.post(SESSION_TOKEN, headers=proxy.auth(), timeout=15)
            # ...and a refusal is sent unrecorded.
            refused = client.get(
                "/v1/liveness/sessions/no-such-session/result", headers=proxy.auth(), timeout=15
            )
        assert withheld.status_code == 503
        assert withheld.json()["type"].endswith("store-unavailable")
        assert refused.status_code == 404
        assert len(proxy.log_events("audit_unavailable")) == 2
        assert metric_value(client, "liveness_proxy_audit_unavailable_total") == 2
        # The store is back: answered and recorded, and nothing more counted.
        assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
        assert metric_value(client, "liveness_proxy_audit_unavailable_total") == 2

"""Exemplars on the latency histograms, and the `/metrics` format negotiation that carries them:
OpenMetrics when the scraper asks for it (Prometheus does by default), the classic text format
otherwise (it has no place for exemplars)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.samples import Sample
from starlette.applications import Starlette
from starlette.routing import Route

from liveness_proxy.metrics import ProxyMetrics, metrics_endpoint, wants_openmetrics

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
ROUTE = "/v1/liveness/sessions/{session_id}/result"
REQUEST_BUCKETS = "liveness_proxy_http_request_duration_seconds_bucket"
UPSTREAM_BUCKETS = "liveness_proxy_upstream_request_duration_seconds_bucket"
# What Prometheus 2.x sends when it scrapes (scrape.go's default Accept header).
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


async def _scrape(metrics: ProxyMetrics, accept: str | None) -> httpx.Response:
    handler = metrics_endpoint(metrics, token="", allowed_networks=["127.0.0.0/8"])
    app = Starlette(routes=[Route("/metrics", handler, methods=["GET"])])
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    headers = {} if accept is None else {"Accept": accept}
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200
    return response


def _openmetrics_samples(text: str, name: str) -> list[Sample]:
    families = parse_openmetrics(text)  # type: ignore[no-untyped-call]  # the parser has no annotations
    return [sample for family in families for sample in family.samples if sample.name == name]


def _exemplar_trace_ids(samples: list[Sample]) -> dict[str, str]:
    """The trace id of each bucket (by its `le`) that holds an exemplar."""
    return {
        sample.labels["le"]: sample.exemplar.labels["trace_id"]
        for sample in samples
        if sample.exemplar is not None
    }


async def test_an_openmetrics_scrape_shows_the_trace_id_on_the_bucket_of_the_observation() -> None:
    metrics = ProxyMetrics()
    metrics.observe_request(ROUTE, "GET", 200, 0.02, trace_id=TRACE_ID)
    metrics.observe_request(ROUTE, "GET", 200, 0.4)  # unsampled: no exemplar of its own

    response = await _scrape(metrics, PROMETHEUS_ACCEPT)

    assert response.headers["content-type"] == "application/openmetrics-text; version=1.0.0; charset=utf-8"
    assert response.text.endswith("# EOF\n")
    [line] = [line for line in response.text.splitlines() if "# {" in line]
    assert line.startswith(f'{REQUEST_BUCKETS}{{le="0.025",method="GET",route="{ROUTE}"}} 1.0 ')
    assert f'# {{trace_id="{TRACE_ID}"}} 0.02 ' in line
    # The whole exposition (process and GC families included) is valid OpenMetrics.
    buckets = _openmetrics_samples(response.text, REQUEST_BUCKETS)
    assert _exemplar_trace_ids(buckets) == {"0.025": TRACE_ID}
    [exemplar] = [sample.exemplar for sample in buckets if sample.exemplar is not None]
    assert exemplar.value == 0.02
    assert exemplar.timestamp is not None


async def test_upstream_latency_keeps_one_exemplar_per_bucket_the_latest() -> None:
    metrics = ProxyMetrics(include_process_metrics=False)
    metrics.observe_upstream("result", "200", 0.003, trace_id=TRACE_ID)
    metrics.observe_upstream("result", "200", 0.004, trace_id=OTHER_TRACE_ID)
    metrics.observe_upstream("result", "504", 12.0, trace_id=TRACE_ID)

    text = (await _scrape(metrics, "application/openmetrics-text")).text

    by_outcome: dict[str, dict[str, str]] = {}
    for sample in _openmetrics_samples(text, UPSTREAM_BUCKETS):
        if sample.exemplar is not None:
            by_outcome.setdefault(sample.labels["outcome"], {})[sample.labels["le"]] = sample.exemplar.labels[
                "trace_id"
            ]
    assert by_outcome == {"200": {"0.005": OTHER_TRACE_ID}, "504": {"30.0": TRACE_ID}}


async def test_without_a_trace_id_no_bucket_has_an_exemplar() -> None:
    metrics = ProxyMetrics(include_process_metrics=False)
    metrics.observe_request(ROUTE, "GET", 200, 0.02)
    metrics.observe_upstream("result", "200", 0.003)

    text = (await _scrape(metrics, PROMETHEUS_ACCEPT)).text

    assert "# {" not in text
    assert _openmetrics_samples(text, REQUEST_BUCKETS)  # the observations are there, bare


@pytest.mark.parametrize("accept", [None, "text/plain;version=0.0.4", "*/*", "text/plain;version=1.0.0"])
async def test_a_plain_scrape_has_no_exemplar_and_is_the_text_format_as_before(accept: str | None) -> None:
    metrics = ProxyMetrics()
    metrics.observe_request(ROUTE, "GET", 200, 0.02, trace_id=TRACE_ID)

    response = await _scrape(metrics, accept)

    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# {" not in response.text
    assert "trace_id" not in response.text
    assert "# EOF" not in response.text
    buckets = {
        sample.labels["le"]: sample.value
        for family in parse_text(response.text)
        for sample in family.samples
        if sample.name == REQUEST_BUCKETS
    }
    assert buckets["0.01"] == 0
    assert buckets["0.025"] == 1


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        (PROMETHEUS_ACCEPT, True),
        ("application/openmetrics-text", True),
        ("Application/OpenMetrics-Text; version=0.0.1", True),
        ("text/plain;q=0.9, application/openmetrics-text;q=0.1", True),
        ("application/openmetrics-text;q=0, text/plain", False),
        ("application/openmetrics-text; q=0.0", False),
        ("text/plain;version=0.0.4", False),
        ("application/json", False),
        ("*/*", False),
        ("", False),
    ],
)
def test_openmetrics_is_chosen_only_when_the_accept_header_names_it(accept: str, openmetrics: bool) -> None:
    assert wants_openmetrics(accept) is openmetrics

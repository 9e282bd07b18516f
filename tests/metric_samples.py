"""What the metrics tests (unit/test_metrics.py and integration/test_metrics_observers.py) share: the
samples a `ProxyMetrics` renders, read back as a scraper would, and an observer that records the
calls of the upstream client's and the token manager's observer hooks."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from liveness_proxy.metrics import ProxyMetrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: ProxyMetrics) -> Samples:
    """Every sample of the rendered output, keyed by name and labels, parsed as a scraper would."""
    body, _ = metrics.render()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    """The sample `name` with exactly `labels`; 0.0 when there is none."""
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


@dataclass
class RecordingObserver:
    """Records every call of the observer hooks (`UpstreamObserver`, `TokenObserver`), in order."""

    upstream: list[tuple[str, str]] = field(default_factory=list)
    refreshes: list[str] = field(default_factory=list)
    cache: list[bool] = field(default_factory=list)

    def observe_upstream(
        self, endpoint: str, outcome: str, seconds: float, trace_id: str | None = None
    ) -> None:
        assert seconds >= 0
        self.upstream.append((endpoint, outcome))

    def token_refreshed(self, outcome: str, seconds: float) -> None:
        assert seconds >= 0
        self.refreshes.append(outcome)

    def token_cache(self, hit: bool) -> None:
        self.cache.append(hit)

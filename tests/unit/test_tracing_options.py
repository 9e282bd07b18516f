"""The OTEL_* settings: tracing is off unless asked for, and every unusable value is refused at
start-up with a message that names the variable and never a header's value."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

from liveness_proxy.errors import ConfigurationError
from liveness_proxy.settings import settings_from_mapping
from liveness_proxy.tracing import Tracing, TracingOptions
from liveness_proxy.tracing.options import parse_key_values, parse_sampler
from liveness_proxy.wiring import app_options, tracing_options
from support import TEST_PEPPER


def options_of(**values: Any) -> TracingOptions:
    return tracing_options(settings_from_mapping({"LIVENESS_PROXY_API_KEY_PEPPER": TEST_PEPPER, **values}))


def test_tracing_is_off_without_an_endpoint_or_an_exporter() -> None:
    options = options_of()
    assert not options.enabled
    tracing = Tracing(options)
    tracing.start()
    assert not tracing.enabled
    assert tracing.tracer is None
    assert tracing.outbound_headers() == []
    with tracing.span("nothing") as span:
        assert span is None


def test_an_endpoint_turns_otlp_on_and_the_traces_path_is_added() -> None:
    options = options_of(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318/")
    assert options.exporters == {"otlp"}
    assert options.traces_endpoint == "http://collector:4318/v1/traces"


def test_the_signal_specific_endpoint_is_used_as_given() -> None:
    options = options_of(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="https://vendor.example/api/traces",
    )
    assert options.traces_endpoint == "https://vendor.example/api/traces"


@pytest.mark.parametrize(
    ("exporter", "expected"),
    [("otlp", {"otlp"}), ("console", {"console"}), ("otlp,console", {"otlp", "console"}), ("none", set())],
)
def test_the_exporter_setting_alone_decides(exporter: str, expected: set[str]) -> None:
    options = options_of(OTEL_TRACES_EXPORTER=exporter, OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318")
    assert options.exporters == expected


def test_the_sdk_disabled_switch_wins() -> None:
    assert not options_of(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318", OTEL_SDK_DISABLED=True).enabled


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "none,otlp"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "PROTOCOL"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"}, "SAMPLER_ARG"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment"}, "OTEL_RESOURCE_ATTRIBUTES"),
    ],
)
def test_unusable_values_are_refused_naming_the_variable(values: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        options_of(**values)


def test_a_malformed_header_setting_never_quotes_the_value() -> None:
    with pytest.raises(ConfigurationError) as refused:
        options_of(OTEL_EXPORTER_OTLP_ENDPOINT="http://c", OTEL_EXPORTER_OTLP_HEADERS="vendor-key-abc123")
    assert "vendor-key-abc123" not in str(refused.value)
    assert "OTEL_EXPORTER_OTLP_HEADERS" in str(refused.value)


def test_headers_are_parsed_and_their_values_are_known_secrets_of_the_log_redactor() -> None:
    values = {
        "LIVENESS_PROXY_API_KEY_PEPPER": TEST_PEPPER,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=vendor%20key%3D42,tenant=acme-prod",
    }
    settings = settings_from_mapping(values)
    assert tracing_options(settings).headers == {"x-api-key": "vendor key=42", "tenant": "acme-prod"}
    assert "vendor key=42" in app_options(settings).secrets
    # The settings' repr (a start-up failure may print it) does not show them either.
    assert "vendor" not in repr(settings)


def test_the_traces_headers_replace_the_common_ones() -> None:
    options = options_of(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318",
        OTEL_EXPORTER_OTLP_HEADERS="a=1",
        OTEL_EXPORTER_OTLP_TRACES_HEADERS="b=2",
    )
    assert options.headers == {"b": "2"}


def test_service_name_and_resource_attributes() -> None:
    assert options_of().service_name == "liveness-proxy"
    assert options_of(OTEL_RESOURCE_ATTRIBUTES="service.name=kyc-proxy").service_name == "kyc-proxy"
    named = options_of(OTEL_SERVICE_NAME="edge-proxy", OTEL_RESOURCE_ATTRIBUTES="service.name=x,team=kyc")
    assert named.service_name == "edge-proxy"
    assert named.resource_attributes["team"] == "kyc"


def test_samplers_by_their_specified_names() -> None:
    assert parse_sampler("always_on", "") is ALWAYS_ON
    assert parse_sampler("always_off", "") is ALWAYS_OFF
    ratio = parse_sampler("traceidratio", "0.25")
    assert isinstance(ratio, TraceIdRatioBased)
    assert ratio.rate == 0.25
    default = parse_sampler("", "")
    assert isinstance(default, ParentBased)
    assert "AlwaysOnSampler" in str(default.get_description())  # type: ignore[no-untyped-call]
    parent_ratio = parse_sampler("parentbased_traceidratio", "0")
    assert isinstance(parent_ratio, ParentBased)
    assert "TraceIdRatioBased{0" in str(parent_ratio.get_description())  # type: ignore[no-untyped-call]


def test_key_values_skip_blanks_and_decode_percent_escapes() -> None:
    assert parse_key_values("X", " a = 1 ,, b=%2C ") == {"a": "1", "b": ","}


def test_incoming_trust_and_forwarders_come_from_their_settings() -> None:
    options = options_of(LIVENESS_PROXY_TRACE_TRUST_INCOMING=True, FORWARDED_ALLOW_IPS="10.0.0.0/8")
    assert options.trust_incoming
    assert options.trusted_forwarders == "10.0.0.0/8"
    assert options_of().trusted_forwarders == "127.0.0.1,::1"

"""What tracing is configured to do, read from the standard `OTEL_*` settings, checked at start-up.

Tracing is on only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or
`OTEL_TRACES_EXPORTER` is set, and `OTEL_SDK_DISABLED` is not true: a proxy that nobody asked to
export spans sends nothing anywhere, not even to the SDK's default `localhost:4318`.

Spans are exported over OTLP/HTTP with protobuf (the collector's port 4318). gRPC is refused with a
clear error instead of silently exporting nothing: its client would add a large dependency for the
same data. What this module does not read (certificates, timeout, compression, the batch
processor's `OTEL_BSP_*`), the SDK reads from the environment itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from liveness_proxy.errors import ConfigurationError

DEFAULT_SERVICE_NAME = "liveness-proxy"
SUPPORTED_EXPORTERS = frozenset({"otlp", "console"})
SUPPORTED_PROTOCOLS = frozenset({"", "http/protobuf"})


@dataclass(frozen=True, slots=True)
class TracingOptions:
    """Everything needed to build the tracer provider; `exporters` empty means tracing is off."""

    exporters: frozenset[str] = frozenset()
    traces_endpoint: str = "http://localhost:4318/v1/traces"
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # may hold a vendor's key
    service_name: str = DEFAULT_SERVICE_NAME
    resource_attributes: dict[str, str] = field(default_factory=dict)
    sampler: Sampler = field(default_factory=lambda: ParentBased(ALWAYS_ON))
    # Continue an incoming traceparent from anyone (not only from trusted forwarders).
    trust_incoming: bool = False
    # Who may forward headers: uvicorn's `FORWARDED_ALLOW_IPS` syntax (addresses, networks, "*").
    trusted_forwarders: str = "127.0.0.1,::1"

    @property
    def enabled(self) -> bool:
        return bool(self.exporters)


def parse_sampler(name: str, argument: str) -> Sampler:
    """`OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, as the specification names them. An
    unknown name is an error here (the SDK would warn and sample everything)."""
    name = (name or "parentbased_always_on").strip().lower()
    ratio = 1.0
    if name.endswith("traceidratio"):
        try:
            ratio = float(argument) if argument.strip() else 1.0
        except ValueError:
            raise ConfigurationError("OTEL_TRACES_SAMPLER_ARG: must be a number between 0 and 1") from None
        if not 0.0 <= ratio <= 1.0:
            raise ConfigurationError("OTEL_TRACES_SAMPLER_ARG: must be a number between 0 and 1")
    roots: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
    }
    if name in roots:
        return roots[name]
    if name.startswith("parentbased_") and name.removeprefix("parentbased_") in roots:
        return ParentBased(roots[name.removeprefix("parentbased_")])
    raise ConfigurationError(
        "OTEL_TRACES_SAMPLER: must be one of always_on, always_off, traceidratio, parentbased_always_on, "
        "parentbased_always_off, parentbased_traceidratio"
    )


def parse_key_values(variable: str, text: str) -> dict[str, str]:
    """`key1=value1,key2=value2` with percent-encoded values (OTEL_EXPORTER_OTLP_HEADERS,
    OTEL_RESOURCE_ATTRIBUTES). The message names the variable, never a value (headers hold keys)."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise ConfigurationError(f"{variable}: expected comma-separated key=value pairs")
        pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


def parse_exporters(text: str) -> frozenset[str]:
    names = frozenset(name.strip().lower() for name in text.split(",") if name.strip())
    if "none" in names:
        if len(names) > 1:
            raise ConfigurationError("OTEL_TRACES_EXPORTER: 'none' cannot be combined with an exporter")
        return frozenset()
    unknown = names - SUPPORTED_EXPORTERS
    if unknown:
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER: {', '.join(sorted(unknown))} not supported (use otlp, console or none)"
        )
    return names


def traces_endpoint(base: str, traces: str) -> str:
    """The signal-specific endpoint as given, else the base endpoint plus `/v1/traces`."""
    if traces.strip():
        return traces.strip()
    base = base.strip() or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"

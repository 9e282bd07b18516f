"""Settings turned into the small option objects the parts take.

This is the one place that reads `Settings` field by field. Everything below the wiring (auth,
limits, upstream, store, http) receives one of these objects or plain values, never the settings:
a part can then be built, and tested, without a whole configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from liveness_proxy.auth.jwt import JwtPolicy
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.jwt_algorithms import ASYMMETRIC_JWT_ALGORITHMS
from liveness_proxy.ratelimit import LimitPolicy
from liveness_proxy.settings import Settings
from liveness_proxy.store.audit_checkpoints import CheckpointSigner
from liveness_proxy.store.database import SQLITE_BUSY_TIMEOUT_MS, PoolOptions
from liveness_proxy.store.retention import RetentionPolicy
from liveness_proxy.tracing.options import (
    DEFAULT_SERVICE_NAME,
    SUPPORTED_PROTOCOLS,
    TracingOptions,
    parse_exporters,
    parse_key_values,
    parse_sampler,
    traces_endpoint,
)
from liveness_proxy.url_secrets import url_secret_values


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    """What the liveness handlers enforce on a request and add to an answer."""

    max_body_bytes: int
    body_timeout_seconds: float
    session_id_fields: tuple[str, ...]  # where a create-session answer may carry the session id
    pass_threshold: float | None  # `passed` is derived from the confidence when set
    extra_body_fields: tuple[str, ...]  # request members forwarded besides the declared ones
    extra_response_fields: tuple[str, ...]  # answer members passed on besides the declared ones
    idempotency_ttl_seconds: float  # how long a create's answer is replayed for its key
    idempotency_lease_seconds: float  # how long a create in flight holds its key
    # Why terminal answers are not stored and served from the proxy's record (None: they are).
    final_result_store_inactive: str | None
    # What else shapes an answer (with the fields above): a stored answer shaped otherwise is not served.
    biometric_fields: tuple[str, ...]
    biometric_max_string_bytes: int


@dataclass(frozen=True, slots=True)
class AppOptions:
    """What the app around the handlers needs: logs, headers, CORS and the metrics route."""

    log_level: str
    log_format: str
    hsts_max_age_seconds: int
    cors_origins: tuple[str, ...]
    metrics_enabled: bool
    metrics_token: str = field(repr=False)
    metrics_allowed_networks: tuple[str, ...]
    # Values no log line may show, known before anything starts (tokens are added as they come).
    secrets: tuple[str, ...] = field(repr=False)
    # What the "started" log line says of the upstream (never a secret).
    upstream_base_url: str
    token_url: str
    upstream_ca: str  # "CYNOPSIS_CA_BUNDLE" or "system": which trust checks the upstream's certificate
    upstream_client_certificate: bool
    final_result_store: str  # "on", or "off (why)": final results served from the proxy's record


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What `serve` enforces per connection (the protocol's `ServeLimits` are built from it) and
    hands uvicorn."""

    max_connections: int
    max_header_bytes: int
    header_timeout_seconds: float
    hsts_max_age_seconds: int
    keepalive_timeout_seconds: float
    shutdown_timeout_seconds: float
    send_timeout_seconds: float
    max_pipelined_requests: int
    tls_cert_file: Path | None
    tls_key_file: Path | None


def request_policy(settings: Settings) -> RequestPolicy:
    return RequestPolicy(
        max_body_bytes=settings.liveness_proxy_max_body_bytes,
        body_timeout_seconds=settings.liveness_proxy_body_timeout_seconds,
        session_id_fields=tuple(settings.cynopsis_session_id_fields),
        pass_threshold=settings.liveness_proxy_pass_threshold,
        extra_body_fields=tuple(settings.liveness_proxy_extra_body_fields),
        extra_response_fields=tuple(settings.liveness_proxy_extra_response_fields),
        idempotency_ttl_seconds=float(settings.liveness_proxy_idempotency_ttl_seconds),
        # Longer than any create can take: the wait for a slot, two access tokens and two sends (the
        # retry after a 401), four store writes each waiting at most a pool or lock timeout (the
        # claim, the token's use, the binding, the answer), and a margin. 72 s by default.
        idempotency_lease_seconds=settings.liveness_proxy_upstream_queue_timeout_seconds
        + 2 * settings.cynopsis_token_timeout_seconds
        + 2 * settings.cynopsis_timeout_seconds
        + 4 * max(settings.liveness_proxy_database_pool_timeout_seconds, SQLITE_BUSY_TIMEOUT_MS / 1000)
        + 10.0,
        final_result_store_inactive=settings.final_result_store_inactive,
        biometric_fields=tuple(settings.liveness_proxy_biometric_fields),
        biometric_max_string_bytes=settings.liveness_proxy_biometric_max_string_bytes,
    )


def final_result_store_line(settings: Settings) -> str:
    """Whether final results are served from the proxy's record, and why not (the `started` log
    line and `check` say it)."""
    reason = settings.final_result_store_inactive
    return "on" if reason is None else f"off ({reason})"


def app_options(settings: Settings) -> AppOptions:
    return AppOptions(
        log_level=settings.liveness_proxy_log_level,
        log_format=settings.liveness_proxy_log_format,
        hsts_max_age_seconds=settings.liveness_proxy_hsts_max_age_seconds,
        cors_origins=tuple(settings.liveness_proxy_cors_origins),
        metrics_enabled=settings.liveness_proxy_metrics_enabled,
        metrics_token=settings.liveness_proxy_metrics_token.get_secret_value(),
        metrics_allowed_networks=tuple(settings.liveness_proxy_metrics_allowed_networks),
        secrets=(
            settings.cynopsis_client_secret.get_secret_value(),
            settings.liveness_proxy_api_key_pepper.get_secret_value(),
            settings.liveness_proxy_metrics_token.get_secret_value(),
            *url_secret_values(settings.liveness_proxy_database_url.get_secret_value()),
            *url_secret_values(settings.redis_url),
            settings.liveness_proxy_token_cache_key.get_secret_value(),
            # A tracing vendor's key travels in the OTLP headers.
            *otlp_header_values(settings),
        ),
        upstream_base_url=settings.cynopsis_api_base_url,
        token_url=settings.cynopsis_token_url,
        upstream_ca="CYNOPSIS_CA_BUNDLE" if settings.cynopsis_ca_bundle is not None else "system",
        upstream_client_certificate=settings.cynopsis_client_cert_file is not None,
        final_result_store=final_result_store_line(settings),
    )


def serve_options(settings: Settings) -> ServeOptions:
    return ServeOptions(
        max_connections=settings.liveness_proxy_max_connections,
        max_header_bytes=settings.liveness_proxy_max_header_bytes,
        header_timeout_seconds=settings.liveness_proxy_header_timeout_seconds,
        hsts_max_age_seconds=settings.liveness_proxy_hsts_max_age_seconds,
        keepalive_timeout_seconds=settings.liveness_proxy_keepalive_timeout_seconds,
        shutdown_timeout_seconds=settings.liveness_proxy_shutdown_timeout_seconds,
        send_timeout_seconds=settings.liveness_proxy_send_timeout_seconds,
        max_pipelined_requests=settings.liveness_proxy_max_pipelined_requests,
        tls_cert_file=settings.liveness_proxy_tls_cert_file,
        tls_key_file=settings.liveness_proxy_tls_key_file,
    )


def pool_options(settings: Settings) -> PoolOptions:
    return PoolOptions(
        size=settings.liveness_proxy_database_pool_size,
        max_overflow=settings.liveness_proxy_database_max_overflow,
        timeout_seconds=settings.liveness_proxy_database_pool_timeout_seconds,
        pgbouncer=settings.liveness_proxy_database_pgbouncer,
        # The same bound on a lock held elsewhere as SQLite's busy timeout: then a 503.
        statement_timeout_seconds=SQLITE_BUSY_TIMEOUT_MS / 1000,
    )


def limit_policy(settings: Settings) -> LimitPolicy:
    return LimitPolicy(
        session_token=settings.liveness_proxy_rate_limit_session_token,
        create_session=settings.liveness_proxy_rate_limit_create_session,
        result=settings.liveness_proxy_rate_limit_result,
        daily_attempts=settings.liveness_proxy_daily_attempts,
        daily_attempts_total=settings.liveness_proxy_daily_attempts_total,
    )


# A limit switched off, in the `limits` notation the settings use (a name, so that it is not read as
# a password assigned to `session_token`).
LIMIT_OFF = "off"


def unauthenticated_limit_policy(settings: Settings) -> LimitPolicy:
    """The address gate's only limit (its counters are its own: see `ratelimit/anonymous.py`)."""
    return LimitPolicy(
        session_token=LIMIT_OFF,
        create_session=LIMIT_OFF,
        result=LIMIT_OFF,
        daily_attempts=0,
        unauthenticated=settings.liveness_proxy_rate_limit_unauthenticated,
    )


def jwt_policy(settings: Settings) -> JwtPolicy:
    """What a JWT must satisfy besides its signature. ConfigurationError (naming the variable) when
    the settings cannot describe a safe policy."""
    if not settings.liveness_proxy_jwt_subject_claim:
        raise ConfigurationError("LIVENESS_PROXY_JWT_SUBJECT_CLAIM: must name a claim")
    algorithms = frozenset(settings.liveness_proxy_jwt_algorithms) & ASYMMETRIC_JWT_ALGORITHMS
    if not algorithms:
        raise ConfigurationError("LIVENESS_PROXY_JWT_ALGORITHMS: must name an asymmetric algorithm")
    audiences = settings.liveness_proxy_jwt_audience
    any_audience = settings.liveness_proxy_jwt_allow_any_audience
    if not audiences and not any_audience:
        raise ConfigurationError(
            "LIVENESS_PROXY_JWT_AUDIENCE: required with JWT callers (the `aud` your identity provider "
            "issues for this proxy), or set LIVENESS_PROXY_JWT_ALLOW_ANY_AUDIENCE=true to accept tokens "
            "issued for any audience"
        )
    if audiences and any_audience:
        raise ConfigurationError(
            "LIVENESS_PROXY_JWT_ALLOW_ANY_AUDIENCE: set either it or LIVENESS_PROXY_JWT_AUDIENCE, not both"
        )
    return JwtPolicy(
        algorithms=algorithms,
        issuer=settings.liveness_proxy_jwt_issuer or None,
        audiences=frozenset(settings.liveness_proxy_jwt_audience),
        subject_claim=settings.liveness_proxy_jwt_subject_claim,
        reference_claim=settings.liveness_proxy_jwt_reference_claim or None,
        leeway_seconds=float(settings.liveness_proxy_jwt_leeway_seconds),
        max_token_bytes=settings.liveness_proxy_jwt_max_token_bytes,
        max_lifetime_seconds=float(settings.liveness_proxy_jwt_max_lifetime_seconds),
    )


def token_refresh_margin(settings: Settings) -> RefreshMargin:
    """Seconds before expiry to refresh: the set margin, at most a third of a short token's life."""
    return RefreshMargin(float(settings.cynopsis_token_refresh_margin_seconds))


@dataclass(frozen=True, slots=True)
class RefreshMargin:
    """Called with a token's lifetime; a callable object so that it pickles and compares."""

    seconds: float

    def __call__(self, lifetime_seconds: float) -> float:
        return min(self.seconds, math.floor(lifetime_seconds / 3))


# -- audit checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditCheckpointOptions:
    """Signed audit checkpoints: who signs, how often, and the file besides the log stream."""

    signer: CheckpointSigner = field(repr=False)
    interval_seconds: float
    file: Path | None


def audit_checkpoint_options(settings: Settings) -> AuditCheckpointOptions | None:
    """The checkpoint set-up, or None without a signing key (then no checkpoints are written).
    ConfigurationError (naming the variable, never key material) for a key file that is not a
    readable, unencrypted Ed25519 private key, or for checkpoints that would go nowhere."""
    key_file = settings.liveness_proxy_audit_signing_key_file
    checkpoint_file = settings.liveness_proxy_audit_checkpoint_file
    if key_file is None:
        if checkpoint_file is not None:
            raise ConfigurationError(
                "LIVENESS_PROXY_AUDIT_CHECKPOINT_FILE: set only together with "
                "LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE (without a signing key no checkpoints are written)"
            )
        return None
    try:
        signer = CheckpointSigner.from_file(key_file)
    except ValueError as exc:
        raise ConfigurationError(f"LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE: {exc}") from None
    if checkpoint_file is None and settings.liveness_proxy_log_level in ("warning", "error"):
        # They are logged at info: above it, and without a file, they would be signed for nobody.
        raise ConfigurationError(
            "LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE: checkpoints are logged at level info, which "
            f"LIVENESS_PROXY_LOG_LEVEL={settings.liveness_proxy_log_level} hides: set "
            "LIVENESS_PROXY_AUDIT_CHECKPOINT_FILE, or the log level to info"
        )
    return AuditCheckpointOptions(
        signer=signer,
        interval_seconds=settings.liveness_proxy_audit_checkpoint_seconds,
        file=checkpoint_file,
    )


@dataclass(frozen=True, slots=True)
class RetentionOptions:
    """What the retention sweep removes (`policy`), and how the background job runs it."""

    policy: RetentionPolicy
    interval_seconds: float  # from the end of one run to the next
    time_budget_seconds: float  # at most this long per run


def retention_options(settings: Settings) -> RetentionOptions:
    return RetentionOptions(
        policy=RetentionPolicy(
            retention_days=settings.liveness_proxy_retention_days,
            audit_plaintext_days=settings.liveness_proxy_audit_plaintext_retention_days,
        ),
        interval_seconds=settings.liveness_proxy_retention_interval_seconds,
        # Half the lease: the run ends (and settles) well before another replica may claim the job.
        time_budget_seconds=settings.worker_lease_seconds / 2,
    )


def _headers_text(settings: Settings) -> tuple[str, str]:
    traces = settings.otel_exporter_otlp_traces_headers.get_secret_value()
    common = settings.otel_exporter_otlp_headers.get_secret_value()
    return (
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", traces)
        if traces.strip()
        else ("OTEL_EXPORTER_OTLP_HEADERS", common)
    )


def otlp_header_values(settings: Settings) -> tuple[str, ...]:
    """The OTLP header values (a vendor's API key), for the log redactor; none when malformed (the
    start-up check reports that)."""
    try:
        return tuple(parse_key_values(*_headers_text(settings)).values())
    except ConfigurationError:
        return ()


def tracing_options(settings: Settings) -> TracingOptions:
    """The tracing configuration (tracing/options.py); ConfigurationError (naming the variable)
    when it is unusable."""
    exporter_text = settings.otel_traces_exporter.strip()
    endpoint_given = bool(
        settings.otel_exporter_otlp_endpoint.strip() or settings.otel_exporter_otlp_traces_endpoint.strip()
    )
    exporters = (
        parse_exporters(exporter_text) if exporter_text else frozenset({"otlp"} if endpoint_given else ())
    )
    if settings.otel_sdk_disabled:
        exporters = frozenset()
    protocol = (
        (settings.otel_exporter_otlp_traces_protocol or settings.otel_exporter_otlp_protocol).strip().lower()
    )
    if "otlp" in exporters and protocol not in SUPPORTED_PROTOCOLS:
        raise ConfigurationError(
            "OTEL_EXPORTER_OTLP_PROTOCOL: only http/protobuf is supported (the collector's port 4318), not "
            + protocol
        )
    resource = parse_key_values("OTEL_RESOURCE_ATTRIBUTES", settings.otel_resource_attributes)
    return TracingOptions(
        exporters=exporters,
        traces_endpoint=traces_endpoint(
            settings.otel_exporter_otlp_endpoint, settings.otel_exporter_otlp_traces_endpoint
        ),
        headers=parse_key_values(*_headers_text(settings)),
        service_name=settings.otel_service_name.strip()
        or resource.get("service.name")
        or DEFAULT_SERVICE_NAME,
        resource_attributes=resource,
        sampler=parse_sampler(settings.otel_traces_sampler, settings.otel_traces_sampler_arg),
        trust_incoming=settings.liveness_proxy_trace_trust_incoming,
        trusted_forwarders=settings.forwarded_allow_ips,
    )

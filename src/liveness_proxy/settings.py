"""Configuration: one typed object, read from the environment (and a `.env` file).

Every field name is the documented environment variable, lower-cased: `cynopsis_token_url` is read
from `CYNOPSIS_TOKEN_URL`. Secrets are `SecretStr` and can also be given as `<NAME>_FILE`, a path to
a file holding the value (how Docker and Kubernetes mount secrets). `Settings.load()` turns every
validation failure into a `ConfigurationError` whose message names the variable and the problem,
and never the value.

It is longer than the other modules on purpose: it is the one declarative list of every variable,
each with its default and bounds, and splitting it would scatter that list.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import limits
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from liveness_proxy.errors import ConfigurationError
from liveness_proxy.jwt_algorithms import ASYMMETRIC_JWT_ALGORITHMS
from liveness_proxy.url_secrets import redact_url
from liveness_proxy.webhook_signing import parse_webhook_secrets

# A URL, not a password (bandit guesses from the name).
DEMO_TOKEN_URL = "https://crm-demo.cynopsis.co/oauth/token"  # nosec B105
DEMO_API_BASE_URL = "https://crm-demo.cynopsis.co"
DEFAULT_DATABASE_URL = "sqlite:///./liveness-proxy.db"

# Fields that may be given as NAME_FILE instead of NAME.
_FILE_BACKED_FIELDS = (
    "cynopsis_client_id",
    "cynopsis_client_secret",
    "liveness_proxy_api_key_pepper",
    "liveness_proxy_database_url",
    "liveness_proxy_metrics_token",
    "liveness_proxy_redis_url",
    "liveness_proxy_subject_key",
    "liveness_proxy_token_cache_key",
    "liveness_proxy_webhook_secret",
)
_MIN_PEPPER_LENGTH = 32
# The members of the declared request bodies and answers (api/declared.py), and those the proxy
# adds to a result: an operator's extra field may not reuse one.
RESERVED_BODY_FIELDS = frozenset({"session_token"})
RESERVED_RESPONSE_FIELDS = frozenset(
    {"session_token", "session_id", "status", "expires_in", "confidence", "redacted_fields", "passed"}
)
_PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "secret", "password", "xxx", "todo"})


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """All settings of one proxy deployment. Build with `Settings.load()` or with keyword arguments."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    # --- Upstream (Cynopsis) -------------------------------------------------------------------
    cynopsis_token_url: str = DEMO_TOKEN_URL
    cynopsis_api_base_url: str = DEMO_API_BASE_URL
    cynopsis_client_id: str = Field(default="", repr=False)
    cynopsis_client_id_file: Path | None = None
    cynopsis_client_secret: SecretStr = SecretStr("")
    cynopsis_client_secret_file: Path | None = None
    cynopsis_domain_id: str = ""
    cynopsis_connect_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    cynopsis_timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    cynopsis_token_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    cynopsis_session_token_path: str = "/service/liveness-v2/get_session_token"
    cynopsis_session_path: str = "/service/liveness-v2/liveness_session"
    cynopsis_result_path: str = "/service/liveness-v2/liveness_result/{session_id}"
    cynopsis_session_id_fields: Annotated[list[str], NoDecode] = ["session_id", "sessionId"]
    cynopsis_max_response_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    cynopsis_max_connections: int = Field(default=1000, ge=1)
    cynopsis_token_default_lifetime_seconds: int = Field(default=300, ge=10)
    cynopsis_token_max_lifetime_seconds: int = Field(default=86400, ge=60)
    cynopsis_token_refresh_margin_seconds: int = Field(default=300, ge=1)
    cynopsis_token_failure_backoff_seconds: float = Field(default=5.0, gt=0, le=300)
    # TLS towards Cynopsis (token endpoint and liveness API): verified against the system's CAs, or
    # against this bundle only (a private CA); an optional client certificate for mTLS.
    cynopsis_ca_bundle: Path | None = None
    cynopsis_client_cert_file: Path | None = None
    cynopsis_client_key_file: Path | None = None
    # Circuit breaker: after this many consecutive failed liveness calls (unreachable, reset,
    # timed out, 5xx), calls fail fast for the open interval, then one probe call decides.
    cynopsis_circuit_failure_threshold: int = Field(default=5, ge=1, le=10000)
    cynopsis_circuit_open_seconds: float = Field(default=10.0, gt=0, le=3600)

    # --- The proxy itself ----------------------------------------------------------------------
    liveness_proxy_host: str = "127.0.0.1"
    liveness_proxy_port: int = Field(default=8080, ge=0, le=65535)
    liveness_proxy_tls_cert_file: Path | None = None
    liveness_proxy_tls_key_file: Path | None = None
    liveness_proxy_allow_insecure_upstream: bool = False
    # What one client may hold of the server (serve only; library mode inherits its host's server).
    liveness_proxy_max_connections: int = Field(default=2048, ge=1, le=1_000_000)
    liveness_proxy_max_header_bytes: int = Field(default=16384, ge=1024, le=1024 * 1024)
    liveness_proxy_header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    liveness_proxy_body_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    liveness_proxy_keepalive_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    liveness_proxy_shutdown_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # A client that leaves its answers unread is cut off after this long; and a connection may
    # queue this many requests behind the one being answered (HTTP/1.1 pipelining).
    liveness_proxy_send_timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    liveness_proxy_max_pipelined_requests: int = Field(default=16, ge=1, le=1024)
    liveness_proxy_database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    liveness_proxy_database_url_file: Path | None = None
    liveness_proxy_database_pool_size: int = Field(default=10, ge=1, le=1000)
    liveness_proxy_database_max_overflow: int = Field(default=10, ge=0, le=1000)
    liveness_proxy_database_pool_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    liveness_proxy_database_pgbouncer: bool = False
    liveness_proxy_api_key_pepper: SecretStr = SecretStr("")
    liveness_proxy_api_key_pepper_file: Path | None = None
    liveness_proxy_api_key_cache_seconds: float = Field(default=10.0, ge=0, le=3600)
    liveness_proxy_max_body_bytes: int = Field(default=65536, ge=2, le=16 * 1024 * 1024)
    liveness_proxy_strip_biometrics: bool = True
    liveness_proxy_biometric_fields: Annotated[list[str], NoDecode] = ["reference_image", "audit_images"]
    liveness_proxy_biometric_allow_fields: Annotated[list[str], NoDecode] = []
    liveness_proxy_biometric_max_string_bytes: int = Field(default=512, ge=16, le=1024 * 1024)
    liveness_proxy_pass_threshold: float | None = Field(default=None, ge=0, le=100)
    # --- Request integrity (declared bodies and answers, bound tokens, idempotent creates) ---
    liveness_proxy_session_token_binding: bool = True
    liveness_proxy_extra_body_fields: Annotated[list[str], NoDecode] = []
    liveness_proxy_extra_response_fields: Annotated[list[str], NoDecode] = []
    liveness_proxy_idempotency_ttl_seconds: int = Field(default=86400, ge=60, le=30 * 86400)
    liveness_proxy_log_level: Literal["debug", "info", "warning", "error"] = "info"
    liveness_proxy_log_format: Literal["json", "console"] = "json"

    # --- Tracing (OpenTelemetry; tracing/options.py): the standard variables, off unless an exporter
    # or endpoint is set. OTEL_EXPORTER_OTLP_HEADERS may hold a vendor's key: secret, never logged.
    otel_sdk_disabled: bool = False
    otel_traces_exporter: str = ""
    otel_exporter_otlp_endpoint: str = ""
    otel_exporter_otlp_traces_endpoint: str = ""
    otel_exporter_otlp_protocol: str = ""
    otel_exporter_otlp_traces_protocol: str = ""
    otel_exporter_otlp_headers: SecretStr = SecretStr("")
    otel_exporter_otlp_traces_headers: SecretStr = SecretStr("")
    otel_service_name: str = ""
    otel_resource_attributes: str = ""
    otel_traces_sampler: str = ""
    otel_traces_sampler_arg: str = ""
    # An incoming `traceparent` is continued only from the addresses trusted to forward headers
    # (uvicorn's FORWARDED_ALLOW_IPS, read here too); from anyone else it is a link on a new trace,
    # unless this says every caller may continue its trace (e.g. behind a gateway that strips it).
    liveness_proxy_trace_trust_incoming: bool = False
    forwarded_allow_ips: str = "127.0.0.1,::1"

    # --- JWT callers (the customer's identity provider) --------------------------------------
    liveness_proxy_jwt_jwks_url: str = ""
    liveness_proxy_jwt_public_key_file: Path | None = None
    liveness_proxy_jwt_issuer: str = ""
    liveness_proxy_jwt_audience: Annotated[list[str], NoDecode] = []
    # Without an audience, tokens the identity provider issued for any of its apps would pass: an
    # audience is required unless the operator says explicitly that any will do.
    liveness_proxy_jwt_allow_any_audience: bool = False
    # The longest a token may live (`exp - iat`) or have left (`exp - now`): a stolen token with
    # an `exp` years away would otherwise be a permanent credential.
    liveness_proxy_jwt_max_lifetime_seconds: int = Field(default=86400, ge=60, le=366 * 86400)
    liveness_proxy_jwt_algorithms: Annotated[list[str], NoDecode] = ["RS256", "ES256"]
    liveness_proxy_jwt_subject_claim: str = "sub"
    # The claim that carries the customer's own business id for the session (webhooks, admin views).
    liveness_proxy_jwt_reference_claim: str = ""
    liveness_proxy_jwt_leeway_seconds: int = Field(default=30, ge=0, le=300)
    liveness_proxy_jwt_max_token_bytes: int = Field(default=8192, ge=256, le=65536)
    liveness_proxy_jwt_jwks_cache_seconds: float = Field(default=300.0, ge=1, le=86400)
    liveness_proxy_jwt_jwks_refetch_interval_seconds: float = Field(default=30.0, ge=1, le=3600)
    liveness_proxy_jwt_jwks_timeout_seconds: float = Field(default=3.0, gt=0, le=60)

    # --- Browsers ------------------------------------------------------------------------------
    liveness_proxy_cors_origins: Annotated[list[str], NoDecode] = []
    liveness_proxy_hsts_max_age_seconds: int = Field(default=31536000, ge=0)

    # --- Limits and quotas (per caller subject) -------------------------------------------------
    liveness_proxy_rate_limit_session_token: str = "10/minute"
    liveness_proxy_rate_limit_create_session: str = "5/minute"
    liveness_proxy_rate_limit_result: str = "120/minute"
    liveness_proxy_daily_attempts: int = Field(default=20, ge=0)
    # Per client address, for requests to the liveness and admin routes without a valid credential.
    liveness_proxy_rate_limit_unauthenticated: str = "60/minute"
    liveness_proxy_daily_attempts_total: int = Field(default=0, ge=0)
    # How long the answer to a failed authentication (401, or the unauthenticated 429) is held back.
    liveness_proxy_failed_auth_delay_seconds: float = Field(default=1.0, ge=0, le=10)
    liveness_proxy_upstream_concurrency: int = Field(default=64, ge=1, le=10000)
    liveness_proxy_upstream_queue_timeout_seconds: float = Field(default=2.0, ge=0, le=60)

    # --- Result reads (api/result_reads.py) ----------------------------------------------------
    # Concurrent reads of one session always share one Cynopsis call; its answer is then reused for
    # this long, per process (0: no reuse).
    liveness_proxy_result_reuse_seconds: float = Field(default=0.3, ge=0, le=5)
    # A terminal answer is stored with its verdict and served from there without a Cynopsis call;
    # only while images are stripped and none is allowed through (`final_result_store_inactive`).
    liveness_proxy_final_result_store: bool = True

    # --- Shared state across replicas (Redis) -------------------------------------------------
    liveness_proxy_redis_url: SecretStr = SecretStr("")
    liveness_proxy_redis_url_file: Path | None = None
    liveness_proxy_redis_key_prefix: str = Field(default="liveness-proxy:", min_length=1, max_length=128)
    liveness_proxy_redis_timeout_seconds: float = Field(default=0.5, gt=0, le=30)
    liveness_proxy_redis_max_connections: int = Field(default=32, ge=1, le=10000)
    liveness_proxy_token_cache_key: SecretStr = SecretStr("")
    liveness_proxy_token_cache_key_file: Path | None = None

    # --- Audit ---------------------------------------------------------------------------------
    liveness_proxy_audit_batch_max: int = Field(default=256, ge=1, le=10000)
    # Signed checkpoints of the chain head (store/audit_checkpoints.py): an Ed25519 private key
    # (PKCS#8 PEM, checked at start-up by the wiring), and an optional file to append them to
    # besides the log stream. Without a key no checkpoints are written.
    liveness_proxy_audit_signing_key_file: Path | None = None
    liveness_proxy_audit_checkpoint_file: Path | None = None
    liveness_proxy_audit_checkpoint_seconds: float = Field(default=60.0, gt=0, le=86400)

    # --- Finalizer: the proxy follows every session it created to its verdict ---------------------
    liveness_proxy_finalizer: bool = True
    # Offsets in seconds after creation at which the proxy reads the result itself.
    liveness_proxy_finalizer_schedule: Annotated[list[float], NoDecode] = [3, 6, 12, 24, 48, 96, 192, 384]
    liveness_proxy_finalizer_deadline_seconds: float = Field(default=600.0, gt=0, le=7 * 86400)
    liveness_proxy_finalizer_concurrency: int = Field(default=4, ge=1, le=1000)

    # --- Webhooks (Standard Webhooks) to the customer's backend ----------------------------------
    liveness_proxy_webhook_url: str = ""
    liveness_proxy_webhook_secret: SecretStr = SecretStr("")
    liveness_proxy_webhook_secret_file: Path | None = None
    liveness_proxy_webhook_timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    liveness_proxy_webhook_retry_schedule: Annotated[list[float], NoDecode] = [
        0,
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        50400,
        72000,
        86400,
    ]
    liveness_proxy_webhook_concurrency: int = Field(default=8, ge=1, le=1000)

    # --- Background work (finalizer follow-ups, webhook deliveries): rows claimed with a lease ----
    # Unset: twice the longest job, and at least 60 s (`worker_lease_seconds`).
    liveness_proxy_worker_lease_seconds: float | None = Field(default=None, ge=1, le=3600)
    liveness_proxy_worker_interval_seconds: float = Field(default=1.0, gt=0, le=60)

    # --- Privacy: erasure, retention, the keyed audit chain (store/subjects.py, store/erasure.py) --
    # Wraps every subject's secret. Lines of `key_id:secret` (or one bare secret); the last wraps,
    # all unwrap (`subjects rewrap` moves every secret to the last), and so does the key derived from
    # the pepper, which wraps while this is unset.
    liveness_proxy_subject_key: SecretStr = SecretStr("")
    liveness_proxy_subject_key_file: Path | None = None
    # Lines of `key_id:secret`: the audit chain's HMAC keys (the last signs). Unset: one key derived
    # from the pepper, which always verifies.
    liveness_proxy_audit_keys_file: Path | None = None
    # Days after which bindings, verdicts and webhook events are deleted (0: kept).
    liveness_proxy_retention_days: int = Field(default=0, ge=0, le=36500)
    # Days after which the plain personal values of audit records are erased, the chain kept (0: kept).
    liveness_proxy_audit_plaintext_retention_days: int = Field(default=0, ge=0, le=36500)
    liveness_proxy_retention_interval_seconds: float = Field(default=3600.0, ge=1, le=7 * 86400)

    # --- Metrics -------------------------------------------------------------------------------
    liveness_proxy_metrics_enabled: bool = True
    liveness_proxy_metrics_token: SecretStr = SecretStr("")
    liveness_proxy_metrics_token_file: Path | None = None
    liveness_proxy_metrics_allowed_networks: Annotated[list[str], NoDecode] = [
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    ]

    @field_validator(
        "cynopsis_session_id_fields",
        "liveness_proxy_biometric_fields",
        "liveness_proxy_biometric_allow_fields",
        "liveness_proxy_extra_body_fields",
        "liveness_proxy_extra_response_fields",
        "liveness_proxy_jwt_audience",
        "liveness_proxy_jwt_algorithms",
        "liveness_proxy_cors_origins",
        "liveness_proxy_metrics_allowed_networks",
        "liveness_proxy_finalizer_schedule",
        "liveness_proxy_webhook_retry_schedule",
        mode="before",
    )
    @classmethod
    def _parse_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("liveness_proxy_jwt_algorithms")
    @classmethod
    def _check_jwt_algorithms(cls, value: list[str]) -> list[str]:
        # Asymmetric only: an HMAC "key" would have to be a shared secret, and accepting HS* beside
        # RS*/ES* is the classic key-confusion hole. "none" is never a signature.
        if not value:
            raise ValueError("must name at least one algorithm")
        for name in value:
            if name not in ASYMMETRIC_JWT_ALGORITHMS:
                allowed = ", ".join(sorted(ASYMMETRIC_JWT_ALGORITHMS))
                raise ValueError(f"{name!r} is not allowed; choose from {allowed}")
        return value

    @field_validator("liveness_proxy_jwt_jwks_url")
    @classmethod
    def _check_jwks_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials in the URL")
        # Whoever can change the JWKS in transit can mint any caller: plain http only on loopback.
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("must use https (plain http is accepted for loopback addresses only)")
        return value

    @field_validator("liveness_proxy_finalizer_schedule", "liveness_proxy_webhook_retry_schedule")
    @classmethod
    def _check_schedule(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("must list at least one delay in seconds")
        if len(value) > 100:
            raise ValueError("must list at most 100 delays")
        for delay in value:
            if not 0 <= delay <= 7 * 86400:
                raise ValueError("each delay must be between 0 and 604800 seconds")
        return value

    @field_validator("liveness_proxy_finalizer_schedule")
    @classmethod
    def _check_offsets_increase(cls, value: list[float]) -> list[float]:
        if any(later <= earlier for earlier, later in itertools.pairwise(value)):
            raise ValueError("offsets must increase strictly (seconds after the session was created)")
        return value

    @field_validator("liveness_proxy_webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
            raise ValueError("must be an absolute http(s) URL without a fragment")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials in the URL")
        # Verdicts and subjects travel to it: plain http only on loopback, like the upstream URLs.
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("must use https (plain http is accepted for loopback addresses only)")
        return value

    @field_validator("liveness_proxy_cors_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            parts = urlsplit(origin)
            if origin == "*" or "*" in origin:
                raise ValueError("wildcards are not allowed: list each origin exactly")
            # An Origin header never carries userinfo: one configured with it would match nothing.
            userinfo = "@" in parts.netloc
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or parts.path
                or parts.query
                or userinfo
            ):
                # Quoted without its password: a configuration error is printed and may be logged.
                raise ValueError(f"{redact_url(origin)!r} is not an origin (scheme://host[:port], no path)")
        return [origin.lower() for origin in value]

    @field_validator(
        "liveness_proxy_rate_limit_session_token",
        "liveness_proxy_rate_limit_create_session",
        "liveness_proxy_rate_limit_result",
        "liveness_proxy_rate_limit_unauthenticated",
    )
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        if value.strip().lower() in ("", "off", "none"):
            return "off"
        try:
            parsed = limits.parse_many(value)
        except ValueError:
            raise ValueError(
                "must be in the limits notation, e.g. '10/minute' or '100/hour;10/minute'"
            ) from None
        if not parsed:
            raise ValueError("must be in the limits notation, e.g. '10/minute'")
        return value

    @field_validator("liveness_proxy_metrics_allowed_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an IP network (CIDR)") from None
        return value

    @field_validator("liveness_proxy_log_level", "liveness_proxy_log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("cynopsis_token_url", "cynopsis_api_base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials in the URL")
        return value.rstrip("/") if value.endswith("/") and parts.path not in ("", "/") else value

    @field_validator("cynopsis_session_token_path", "cynopsis_session_path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or "#" in value:
            raise ValueError("must be an absolute path starting with '/', without query or fragment")
        return value

    @field_validator("cynopsis_result_path")
    @classmethod
    def _check_result_path(cls, value: str) -> str:
        if not value.startswith("/") or value.count("{session_id}") != 1 or "?" in value or "#" in value:
            raise ValueError("must be an absolute path containing '{session_id}' exactly once")
        return value

    @field_validator("cynopsis_session_id_fields")
    @classmethod
    def _check_id_fields(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one field")
        return value

    @field_validator("liveness_proxy_extra_body_fields", "liveness_proxy_extra_response_fields")
    @classmethod
    def _check_extra_fields(cls, value: list[str], info: ValidationInfo) -> list[str]:
        # The names the declared shapes define themselves (or the proxy adds) cannot be listed again:
        # an extra field never changes what a declared one means.
        reserved = (
            RESERVED_BODY_FIELDS
            if info.field_name == "liveness_proxy_extra_body_fields"
            else RESERVED_RESPONSE_FIELDS
        )
        spellings = {_spelling(declared) for declared in reserved}
        for name in value:
            if not 0 < len(name) <= 128 or not name.isprintable():
                raise ValueError(f"{name[:40]!r} is not a field name (1-128 printable characters)")
            # `sessionToken` too: another spelling of a declared member would carry it unchecked.
            if _spelling(name) in spellings:
                raise ValueError(f"{name!r} is a declared member (or another spelling of one)")
        return value

    @field_validator("liveness_proxy_redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("liveness_proxy_token_cache_key")
    @classmethod
    def _check_token_cache_key(cls, value: SecretStr) -> SecretStr:
        key = value.get_secret_value()
        if key and len(key) < _MIN_PEPPER_LENGTH:
            raise ValueError(f"must be a random value of at least {_MIN_PEPPER_LENGTH} characters")
        return value

    @model_validator(mode="after")
    def _refuse_plain_http_upstream(self) -> Settings:
        # The client secret and every access token travel to these URLs: plain http only to
        # loopback (the built-in sandbox), or when the operator says so explicitly.
        if self.liveness_proxy_allow_insecure_upstream:
            return self
        for name in ("cynopsis_token_url", "cynopsis_api_base_url"):
            parts = urlsplit(getattr(self, name))
            if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
                raise ValueError(
                    f"{name.upper()}: must use https (plain http only for loopback addresses, "
                    "or with LIVENESS_PROXY_ALLOW_INSECURE_UPSTREAM=true, for development only)"
                )
        return self

    @model_validator(mode="after")
    def _check_lease_outlasts_a_job(self) -> Settings:
        # Leases are not renewed: a job that can run longer than its lease would be claimed again
        # while it still runs, and a webhook would go out twice without any crash.
        longest = self._longest_job_seconds
        lease = self.liveness_proxy_worker_lease_seconds
        if lease is not None and lease <= longest:
            raise ValueError(
                "LIVENESS_PROXY_WORKER_LEASE_SECONDS: must be longer than the longest job it covers "
                f"({longest:g} s: LIVENESS_PROXY_WEBHOOK_TIMEOUT_SECONDS, or CYNOPSIS_TIMEOUT_SECONDS plus "
                "CYNOPSIS_TOKEN_TIMEOUT_SECONDS)"
            )
        return self

    @model_validator(mode="after")
    def _check_certificate_pairs(self) -> Settings:
        pairs = (
            ("liveness_proxy_tls_cert_file", "liveness_proxy_tls_key_file"),
            ("cynopsis_client_cert_file", "cynopsis_client_key_file"),
        )
        for cert, key in pairs:
            if getattr(self, key) is not None and getattr(self, cert) is None:
                raise ValueError(f"{key.upper()}: set only together with {cert.upper()}")
        if self.liveness_proxy_tls_cert_file is not None and self.liveness_proxy_tls_key_file is None:
            # A server certificate file may hold its key too, but say so explicitly: the common
            # mistake is forgetting the key, not bundling it.
            raise ValueError(
                "LIVENESS_PROXY_TLS_KEY_FILE: required with LIVENESS_PROXY_TLS_CERT_FILE "
                "(the same path if the certificate file holds the key)"
            )
        return self

    @model_validator(mode="after")
    def _read_secret_files(self) -> Settings:
        # Frozen model: values read from *_FILE are written with object.__setattr__ on purpose.
        for name in _FILE_BACKED_FIELDS:
            path: Path | None = getattr(self, f"{name}_file")
            if path is None:
                continue
            env_name = name.upper()
            try:
                content = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"{env_name}_FILE: cannot read the file ({exc.strerror})") from None
            if not content:
                raise ValueError(f"{env_name}_FILE: the file is empty")
            current = getattr(self, name)
            object.__setattr__(self, name, SecretStr(content) if isinstance(current, SecretStr) else content)
        return self

    # -- derived values ---------------------------------------------------------------------------

    @property
    def _longest_job_seconds(self) -> float:
        """The longest a background job can take: a webhook attempt, or a finalizer read that may
        first wait for an access token."""
        return max(
            self.liveness_proxy_webhook_timeout_seconds,
            self.cynopsis_timeout_seconds + self.cynopsis_token_timeout_seconds,
        )

    @property
    def worker_lease_seconds(self) -> float:
        """The lease of a claimed job: as set, or twice the longest job and at least 60 s."""
        if self.liveness_proxy_worker_lease_seconds is not None:
            return self.liveness_proxy_worker_lease_seconds
        return max(60.0, 2 * self._longest_job_seconds)

    @property
    def final_result_store_inactive(self) -> str | None:
        """Why terminal answers are not stored and served from the proxy's record (None: they
        are). A stored answer must never hold an image: the store is only active while images are
        stripped and no image field is allowed through."""
        if not self.liveness_proxy_final_result_store:
            return "LIVENESS_PROXY_FINAL_RESULT_STORE is off"
        if not self.liveness_proxy_strip_biometrics:
            return "LIVENESS_PROXY_STRIP_BIOMETRICS is false"
        if self.liveness_proxy_biometric_allow_fields:
            return "LIVENESS_PROXY_BIOMETRIC_ALLOW_FIELDS is set"
        return None

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL with an async driver, whatever form the operator wrote."""
        return async_database_url(self.liveness_proxy_database_url.get_secret_value())

    @property
    def redis_url(self) -> str:
        return self.liveness_proxy_redis_url.get_secret_value()

    def require_upstream_credentials(self) -> None:
        """Checks what talking to Cynopsis needs; raises ConfigurationError naming the first gap."""
        if not self.cynopsis_client_id:
            raise ConfigurationError("CYNOPSIS_CLIENT_ID: required (or CYNOPSIS_CLIENT_ID_FILE)")
        if not self.cynopsis_client_secret.get_secret_value():
            raise ConfigurationError("CYNOPSIS_CLIENT_SECRET: required (or CYNOPSIS_CLIENT_SECRET_FILE)")
        if not self.cynopsis_domain_id:
            raise ConfigurationError("CYNOPSIS_DOMAIN_ID: required")
        if not re.fullmatch(r"[\x21-\x7e]{1,256}", self.cynopsis_domain_id):
            raise ConfigurationError("CYNOPSIS_DOMAIN_ID: must be 1-256 printable characters without spaces")

    def require_api_key_pepper(self) -> None:
        """Checks the pepper that API-key hashes depend on."""
        pepper = self.liveness_proxy_api_key_pepper.get_secret_value()
        if not pepper:
            raise ConfigurationError(
                "LIVENESS_PROXY_API_KEY_PEPPER: required (or LIVENESS_PROXY_API_KEY_PEPPER_FILE); "
                "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        if len(pepper) < _MIN_PEPPER_LENGTH or pepper.lower() in _PLACEHOLDER_SECRETS:
            raise ConfigurationError(
                "LIVENESS_PROXY_API_KEY_PEPPER: must be a random value of at least "
                f"{_MIN_PEPPER_LENGTH} characters"
            )

    def require_webhook_secret(self) -> None:
        """With a webhook URL, its signing secret(s) must be set and well formed."""
        if not self.liveness_proxy_webhook_url:
            return
        secret = self.liveness_proxy_webhook_secret.get_secret_value()
        if not secret:
            raise ConfigurationError(
                "LIVENESS_PROXY_WEBHOOK_SECRET: required with LIVENESS_PROXY_WEBHOOK_URL "
                "(or LIVENESS_PROXY_WEBHOOK_SECRET_FILE); generate one with `liveness-proxy webhooks secret`"
            )
        try:
            parse_webhook_secrets(secret)
        except ValueError as exc:
            raise ConfigurationError(f"LIVENESS_PROXY_WEBHOOK_SECRET: {exc}") from None

    def require_proxy_secrets(self) -> None:
        """Everything a running proxy cannot do without."""
        self.require_upstream_credentials()
        self.require_api_key_pepper()
        self.require_webhook_secret()

    @classmethod
    def load(cls, env_file: str | Path | None = ".env", **overrides: Any) -> Settings:
        """Reads the environment (and `env_file` if it exists); raises ConfigurationError on any problem."""
        try:
            return cls(_env_file=env_file, **overrides)
        except ValidationError as exc:
            raise ConfigurationError(describe_validation_error(exc)) from None
        except ValueError as exc:  # raised by _read_secret_files outside pydantic's wrapping
            raise ConfigurationError(str(exc)) from None

    def redacted_summary(self) -> dict[str, str]:
        """What `check` prints: every setting, secrets replaced by whether they are set, and URLs
        (the database's and Redis's, and any other) without their passwords (`url_secrets`)."""
        summary: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                shown = "set (hidden)" if value.get_secret_value() else "not set"
                if name in ("liveness_proxy_database_url", "liveness_proxy_redis_url"):
                    shown = value.get_secret_value()
            elif name == "cynopsis_client_id":
                shown = f"{value[:3]}… (hidden)" if value else "not set"
            elif isinstance(value, list):
                shown = ",".join(str(item) for item in value)
            else:
                shown = "" if value is None else str(value)
            summary[name.upper()] = redact_url(shown)
        return summary


def _spelling(name: str) -> str:
    # session_token, sessionToken and Session-Token are one member to anyone lenient enough.
    return name.replace("_", "").replace("-", "").lower()


def _is_loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def describe_validation_error(exc: ValidationError) -> str:
    """One line: the first failing variable and the problem, never the rejected value."""
    first = exc.errors(include_input=False, include_url=False)[0]
    location = ".".join(str(part) for part in first["loc"]) or "configuration"
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["loc"]:
        return f"{location.upper()}: {message}"
    return message


def async_database_url(url: str) -> str:
    """Maps plain `sqlite://` and `postgresql://` URLs to the async drivers this service uses."""
    if url.startswith(("sqlite:///", "sqlite://")):
        return "sqlite+aiosqlite" + url.removeprefix("sqlite")
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url.removeprefix(prefix)
    return url


def settings_from_mapping(values: Mapping[str, Any]) -> Settings:
    """Builds settings from explicit values only (no environment, no .env): for tests and embedding."""
    try:
        return Settings(_env_file=None, **{key.lower(): value for key, value in values.items()})
    except ValidationError as exc:
        raise ConfigurationError(describe_validation_error(exc)) from None

"""The parts the service is built from, each from the settings: one function a part, so that
the CLI (`check`) and `serve` (its checks before start-up) build them the same way."""

from __future__ import annotations

import functools
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from liveness_proxy.auth import JwtAuthenticator
from liveness_proxy.auth.jwks import (
    JwksCache,
    KeySource,
    PublicKeyFileError,
    StaticKeySource,
    load_public_key_file,
)
from liveness_proxy.auth.jwks_http import HttpJwksFetcher
from liveness_proxy.auth.jwt import JwtPolicy
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.http import HttpTransport
from liveness_proxy.metrics import ProxyMetrics
from liveness_proxy.settings import Settings
from liveness_proxy.store.audit_chain import parse_audit_keys
from liveness_proxy.store.database import MigrationKeys
from liveness_proxy.store.subjects import SubjectKeys
from liveness_proxy.tracing import Tracing
from liveness_proxy.upstream import (
    ClientCredentialsFetcher,
    TokenCipher,
)
from liveness_proxy.upstream.client_secret import ClientSecretSource
from liveness_proxy.upstream.tls import upstream_ssl_context
from liveness_proxy.wiring.options import audit_checkpoint_options, jwt_policy, tracing_options


@dataclass(frozen=True, slots=True)
class CircuitSignals:
    """The circuit breaker's state changes as a log line and metrics; refusals as a metric only (a
    line per refused request would flood the log exactly when the upstream is down)."""

    metrics: ProxyMetrics
    logger: structlog.typing.FilteringBoundLogger

    def circuit_changed(self, is_open: bool, consecutive_failures: int) -> None:
        self.metrics.circuit_changed(is_open, consecutive_failures)
        if is_open:
            self.logger.warning("upstream_circuit_opened", consecutive_failures=consecutive_failures)
        else:
            self.logger.info("upstream_circuit_closed")

    def circuit_rejected(self) -> None:
        self.metrics.circuit_rejected()


def create_redis(settings: Settings) -> aioredis.Redis | None:
    """The deployment's Redis client (one connection pool per process), or None without Redis.
    Short timeouts: a Redis that hangs must cost a request half a second once, not a worker."""
    if not settings.redis_url:
        return None
    timeout = settings.liveness_proxy_redis_timeout_seconds
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        # Bounded: asyncio Redis takes one connection per command in flight, so an unbounded pool
        # grows with concurrency (54 connections at 64 concurrent requests, measured). Past the
        # bound a command waits for a free connection, up to the timeout.
        max_connections=settings.liveness_proxy_redis_max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # One immediate retry on a dropped connection (an idle one the server closed); none on a
        # timeout, which would double the wait on a hung Redis. redis-py's default (several retries
        # with growing pauses) would hold every request for seconds while Redis is down.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        # Shown by CLIENT LIST: which process holds which connection.
        client_name=f"liveness-proxy:{os.getpid()}",
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: closing it closes both


def token_cipher(settings: Settings) -> TokenCipher:
    """Seals the shared token. The key comes from LIVENESS_PROXY_TOKEN_CACHE_KEY, or else from the
    API-key pepper and the client secret together: every process holds both already, and the
    pepper (at least 32 random characters, checked at start-up) keeps a sealed token read from
    Redis or the database from becoming an offline test of guesses at the client secret.

    Always the client secret read at start-up, never one re-read later: processes that saw a
    rotation and those that did not must keep opening each other's token. A process started after
    a rotation derives another key, so it fetches a token of its own (correct, but no longer one
    token for the whole fleet until all have restarted); deployments that rotate the client secret
    set LIVENESS_PROXY_TOKEN_CACHE_KEY, which no rotation touches."""
    secret = settings.liveness_proxy_token_cache_key.get_secret_value() or "\0".join(
        (
            settings.liveness_proxy_api_key_pepper.get_secret_value(),
            settings.cynopsis_client_secret.get_secret_value(),
        )
    )
    context = "\n".join(
        (settings.cynopsis_token_url, settings.cynopsis_client_id, settings.cynopsis_domain_id)
    )
    return TokenCipher(secret.encode(), context=context)


def cynopsis_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context for the token endpoint and the liveness API (not the JWKS: upstream/tls.py)."""
    return upstream_ssl_context(
        ca_bundle=settings.cynopsis_ca_bundle,
        client_cert_file=settings.cynopsis_client_cert_file,
        client_key_file=settings.cynopsis_client_key_file,
    )


def client_secret_source(
    settings: Settings,
    *,
    logger: structlog.typing.FilteringBoundLogger | None = None,
    on_new_secret: Callable[[str], None] | None = None,
) -> ClientSecretSource:
    """The client secret as read at start-up, re-readable from CYNOPSIS_CLIENT_SECRET_FILE if set."""
    return ClientSecretSource(
        settings.cynopsis_client_secret.get_secret_value(),
        path=settings.cynopsis_client_secret_file,
        logger=logger,
        on_new_secret=on_new_secret,
    )


def token_fetcher(
    http: HttpTransport,
    settings: Settings,
    *,
    client_secret: ClientSecretSource | None = None,
    tracing: Tracing | None = None,
) -> ClientCredentialsFetcher:
    """The client-credentials token request, as configured (also used by `liveness-proxy check`).
    `http` carries the TLS context (`cynopsis_ssl_context`)."""
    secret = client_secret if client_secret is not None else client_secret_source(settings)
    return ClientCredentialsFetcher(
        http,
        token_url=settings.cynopsis_token_url,
        client_id=settings.cynopsis_client_id,
        client_secret=secret.current,
        default_lifetime_seconds=settings.cynopsis_token_default_lifetime_seconds,
        max_lifetime_seconds=settings.cynopsis_token_max_lifetime_seconds,
        timeout_seconds=settings.cynopsis_token_timeout_seconds,
        reload_client_secret=functools.partial(secret.reload, trigger="invalid_client"),
        tracing=tracing,
    )


def warn_if_jwt_claims_unchecked(settings: Settings, logger: structlog.typing.FilteringBoundLogger) -> None:
    unchecked = [
        name
        for name, value in (
            ("LIVENESS_PROXY_JWT_ISSUER", settings.liveness_proxy_jwt_issuer),
            ("LIVENESS_PROXY_JWT_AUDIENCE", settings.liveness_proxy_jwt_audience),
        )
        if not value
    ]
    if unchecked:
        # Without them, any token the identity provider signs for any of its apps is accepted.
        logger.warning("jwt_claims_not_checked", unset=unchecked)


def jwt_authenticator(
    settings: Settings,
    *,
    http: HttpTransport,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    on_jwks_failure: Callable[[str], None] | None = None,
) -> JwtAuthenticator | None:
    """The JWT authenticator the settings describe, or None when JWT callers are not configured.

    Raises ConfigurationError (naming the variable, never a key) when both a JWKS URL and a key file
    are set, or the key file cannot be used. `clock` times the JWKS cache, `wall_clock` checks
    `exp`/`nbf`/`iat`; `on_jwks_failure` receives a one-line reason (no response content) for logs.
    """
    policy = checked_jwt_policy(settings)
    if policy is None:
        return None
    key_file = settings.liveness_proxy_jwt_public_key_file
    keys: KeySource
    if key_file is not None:
        try:
            keys = StaticKeySource(load_public_key_file(key_file, policy.algorithms))
        except PublicKeyFileError as exc:
            raise ConfigurationError(f"LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE: {exc}") from None
    else:
        keys = JwksCache(
            HttpJwksFetcher(
                http,
                url=settings.liveness_proxy_jwt_jwks_url,
                timeout_seconds=settings.liveness_proxy_jwt_jwks_timeout_seconds,
            ),
            allowed_algorithms=policy.algorithms,
            cache_seconds=settings.liveness_proxy_jwt_jwks_cache_seconds,
            refetch_interval_seconds=settings.liveness_proxy_jwt_jwks_refetch_interval_seconds,
            clock=clock,
            on_failure=on_jwks_failure,
        )
    return JwtAuthenticator(policy, keys, wall_clock=wall_clock)


def checked_jwt_policy(settings: Settings) -> JwtPolicy | None:
    """The JWT policy, or None when JWT callers are not configured; ConfigurationError (naming the
    variable, never a key) when both a JWKS URL and a key file are set."""
    if not settings.liveness_proxy_jwt_jwks_url and settings.liveness_proxy_jwt_public_key_file is None:
        return None
    if settings.liveness_proxy_jwt_jwks_url and settings.liveness_proxy_jwt_public_key_file is not None:
        raise ConfigurationError(
            "LIVENESS_PROXY_JWT_JWKS_URL: set either it or LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE, not both"
        )
    return jwt_policy(settings)


def check_startable(settings: Settings) -> None:
    """Everything about the settings that can fail without opening anything: the secrets, the TLS
    files towards Cynopsis, the JWT set-up and its key file, the audit signing key. `serve` calls it
    before it binds a port, so that each of these ends the command with one line instead of a failed
    start per worker."""
    settings.require_proxy_secrets()
    cynopsis_ssl_context(settings)
    privacy_keys(settings)
    policy = checked_jwt_policy(settings)
    key_file = settings.liveness_proxy_jwt_public_key_file
    if policy is not None and key_file is not None:
        try:
            load_public_key_file(key_file, policy.algorithms)
        except PublicKeyFileError as exc:
            raise ConfigurationError(f"LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE: {exc}") from None
    # The audit checkpoints' signing key (and where they go).
    audit_checkpoint_options(settings)
    # The OTEL_* tracing settings (sampler, exporter, protocol).
    tracing_options(settings)


def privacy_keys(settings: Settings) -> MigrationKeys:
    """The audit chain's HMAC keys (LIVENESS_PROXY_AUDIT_KEYS_FILE, and the one derived from the
    pepper) and the subject keys (LIVENESS_PROXY_SUBJECT_KEY, or one derived from the pepper)."""
    settings.require_api_key_pepper()
    pepper = settings.liveness_proxy_api_key_pepper.get_secret_value()
    keys_file = settings.liveness_proxy_audit_keys_file
    text = ""
    if keys_file is not None:
        try:
            text = keys_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(
                f"LIVENESS_PROXY_AUDIT_KEYS_FILE: cannot read the file ({exc.strerror})"
            ) from None
        except UnicodeDecodeError:
            raise ConfigurationError("LIVENESS_PROXY_AUDIT_KEYS_FILE: not UTF-8 text") from None
    try:
        audit = parse_audit_keys(text, pepper=pepper)
    except ValueError as exc:
        raise ConfigurationError(f"LIVENESS_PROXY_AUDIT_KEYS_FILE: {exc}") from None
    try:
        subjects = SubjectKeys.from_settings_values(
            pepper=pepper, subject_key=settings.liveness_proxy_subject_key.get_secret_value()
        )
    except ValueError as exc:
        # Named as the operator set it: the value itself, or the file it was read from.
        name = "LIVENESS_PROXY_SUBJECT_KEY" + ("_FILE" if settings.liveness_proxy_subject_key_file else "")
        raise ConfigurationError(f"{name}: {exc}") from None
    return MigrationKeys(audit=audit, subjects=subjects)

"""The running service: every part built from settings at start-up, and closed at shutdown."""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.auth import (
    ApiKeyAuthenticator,
    Authenticator,
    CallerAuthentication,
    JwtAuthenticator,
)
from liveness_proxy.auth.jwks import (
    HttpJwksFetcher,
    JwksCache,
    KeySource,
    PublicKeyFileError,
    StaticKeySource,
    load_public_key_file,
)
from liveness_proxy.auth.jwt import JwtPolicy
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.metrics import ProxyMetrics
from liveness_proxy.observability import Redactor
from liveness_proxy.privacy import BiometricFilter
from liveness_proxy.ratelimit import SubjectLimits, UpstreamGate, redis_limit_storage
from liveness_proxy.settings import Settings
from liveness_proxy.store import (
    ApiKeyStore,
    AuditLog,
    SessionOwnership,
    create_engine,
    ping,
    upgrade_database,
)
from liveness_proxy.upstream import (
    ClientCredentialsFetcher,
    CynopsisClient,
    CynopsisEndpoints,
    DatabaseTokenStore,
    RedisTokenStore,
    SharedTokenPolicy,
    TokenCipher,
    TokenEndpointError,
    TokenManager,
    TokenStore,
    create_http_session,
)
from liveness_proxy.upstream.circuit import CircuitBreaker
from liveness_proxy.upstream.client_secret import ClientSecretSource
from liveness_proxy.upstream.http1 import Http1Pool
from liveness_proxy.upstream.tls import upstream_ssl_context
from liveness_proxy.upstream.transport import USER_AGENT
from liveness_proxy.wiring.options import jwt_policy, limit_policy, pool_options, token_refresh_margin


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


@dataclass(frozen=True, slots=True)
class Service:
    """The running parts of one proxy, as the handlers and the process around them use them.

    Built and closed by `running_service`; nothing here is ever None-checked per request."""

    engine: AsyncEngine
    tokens: TokenManager
    cynopsis: CynopsisClient
    ownership: SessionOwnership
    audit: AuditLog
    authentication: CallerAuthentication
    biometrics: BiometricFilter
    limits: SubjectLimits
    upstream_gate: UpstreamGate
    metrics: ProxyMetrics
    logger: structlog.typing.FilteringBoundLogger
    wall_clock: Callable[[], float]
    client_secret: ClientSecretSource
    redis: aioredis.Redis | None

    async def ping_store(self) -> None:
        await ping(self.engine)

    async def ping_redis(self) -> None:
        if self.redis is not None:
            await self.redis.ping()


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
    http: aiohttp.ClientSession,
    settings: Settings,
    *,
    client_secret: ClientSecretSource | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> ClientCredentialsFetcher:
    """The client-credentials token request, as configured (also used by `liveness-proxy check`).
    Without `ssl_context` one is built from the settings (ConfigurationError if its files are bad)."""
    secret = client_secret if client_secret is not None else client_secret_source(settings)
    return ClientCredentialsFetcher(
        http,
        token_url=settings.cynopsis_token_url,
        client_id=settings.cynopsis_client_id,
        client_secret=secret.current,
        default_lifetime_seconds=settings.cynopsis_token_default_lifetime_seconds,
        max_lifetime_seconds=settings.cynopsis_token_max_lifetime_seconds,
        timeout_seconds=settings.cynopsis_token_timeout_seconds,
        ssl_context=ssl_context if ssl_context is not None else cynopsis_ssl_context(settings),
        reload_client_secret=functools.partial(secret.reload, trigger="invalid_client"),
    )


@contextlib.asynccontextmanager
async def running_service(
    settings: Settings,
    *,
    logger: structlog.typing.FilteringBoundLogger,
    redactor: Redactor,
    metrics: ProxyMetrics,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    shared_clock: Callable[[], float] = time.time,
    migrate: bool = False,
) -> AsyncIterator[Service]:
    """Builds every part from settings, and closes everything it opened, in reverse order, however
    the block ends, a failure halfway through start-up included.

    `clock` drives token, cache and JWKS expiry (monotonic by default); `wall_clock` stamps records
    and checks JWT times; `shared_clock` (a wall clock: it must agree across machines) dates the
    token shared with other processes."""
    settings.require_proxy_secrets()
    # First: a bad certificate or key file stops start-up before anything is opened.
    upstream_tls = cynopsis_ssl_context(settings)
    async with contextlib.AsyncExitStack() as opened:
        engine = create_engine(settings.database_url, pool=pool_options(settings))
        opened.push_async_callback(engine.dispose)
        redis = create_redis(settings)
        if redis is not None:
            opened.push_async_callback(redis.aclose)
        if migrate:
            # On an engine of its own: the serving engine's statement timeout (a bounded wait on a
            # lock, then 503) must not cut a migration that waits for another replica's or rewrites
            # a table.
            migration_engine = create_engine(settings.database_url, pool_size=1)
            try:
                await upgrade_database(migration_engine)
            finally:
                await migration_engine.dispose()
        http = create_http_session(
            max_connections=settings.cynopsis_max_connections,
            connect_timeout_seconds=settings.cynopsis_connect_timeout_seconds,
            total_timeout_seconds=settings.cynopsis_timeout_seconds,
        )
        opened.push_async_callback(http.close)

        def log_token_failure(error: TokenEndpointError) -> None:
            logger.warning("upstream_token_failed", reason=str(error), upstream_status=error.status)

        def log_tls_failure(reason: str) -> None:
            # One line per failed handshake; the circuit breaker bounds how many while it persists.
            logger.warning("upstream_tls_failed", reason=reason, upstream=settings.cynopsis_api_base_url)

        def remember_client_secret(secret: str) -> None:
            redactor.add_secret(secret, permanent=True)

        client_secret = client_secret_source(settings, logger=logger, on_new_secret=remember_client_secret)

        def shared_state_failed(component: str) -> Callable[[str], None]:
            def report(reason: str) -> None:
                metrics.shared_state_failed(component)
                logger.warning("shared_state_unavailable", component=component, reason=reason)

            return report

        token_store: TokenStore
        if redis is not None:
            token_store = RedisTokenStore(
                redis,
                key_prefix=settings.liveness_proxy_redis_key_prefix,
                cipher=token_cipher(settings),
                wall_clock=shared_clock,
            )
        else:
            token_store = DatabaseTokenStore(engine, cipher=token_cipher(settings), wall_clock=shared_clock)
        lease_seconds = 5.0
        tokens = TokenManager(
            token_fetcher(http, settings, client_secret=client_secret, ssl_context=upstream_tls),
            refresh_margin=token_refresh_margin(settings),
            failure_backoff_seconds=settings.cynopsis_token_failure_backoff_seconds,
            clock=clock,
            wall_clock=shared_clock,
            on_failure=log_token_failure,
            on_new_token=redactor.add_secret,
            observer=metrics,
            shared=SharedTokenPolicy(
                store=token_store,
                unavailable=shared_state_failed("token_cache"),
                # Long enough for another process's token request to finish, or for its lease to
                # lapse if it crashed during one.
                wait_seconds=settings.cynopsis_token_timeout_seconds + lease_seconds,
                lease_seconds=lease_seconds,
            ),
        )
        opened.push_async_callback(tokens.close)
        endpoints = CynopsisEndpoints(
            api_base_url=settings.cynopsis_api_base_url,
            session_token_path=settings.cynopsis_session_token_path,
            session_path=settings.cynopsis_session_path,
            result_path=settings.cynopsis_result_path,
        )
        liveness_http = Http1Pool(
            endpoints.origin,
            max_connections=settings.cynopsis_max_connections,
            connect_timeout_seconds=settings.cynopsis_connect_timeout_seconds,
            user_agent=USER_AGENT,
            ssl_context=upstream_tls,
            on_tls_failure=log_tls_failure,
        )
        opened.push_async_callback(liveness_http.close)
        cynopsis = CynopsisClient(
            liveness_http,
            tokens,
            endpoints=endpoints,
            domain_id=settings.cynopsis_domain_id,
            max_response_bytes=settings.cynopsis_max_response_bytes,
            timeout_seconds=settings.cynopsis_timeout_seconds,
            observer=metrics,
            circuit=CircuitBreaker(
                failure_threshold=settings.cynopsis_circuit_failure_threshold,
                # Real time, not `clock`: a test's manual clock standing still would keep it open.
                open_seconds=settings.cynopsis_circuit_open_seconds,
                observer=CircuitSignals(metrics, logger),
            ),
        )
        authenticators: list[Authenticator] = [
            ApiKeyAuthenticator(
                ApiKeyStore(engine),
                pepper=settings.liveness_proxy_api_key_pepper.get_secret_value().encode(),
                cache_seconds=settings.liveness_proxy_api_key_cache_seconds,
                clock=clock,
            )
        ]

        def log_jwks_failure(reason: str) -> None:
            logger.warning("jwks_fetch_failed", reason=reason)

        jwt = jwt_authenticator(
            settings, http=http, clock=clock, wall_clock=wall_clock, on_jwks_failure=log_jwks_failure
        )
        if jwt is not None:
            warn_if_jwt_claims_unchecked(settings, logger)
            authenticators.append(jwt)
            opened.push_async_callback(jwt.close)
            await jwt.start()  # best effort: a JWKS host that is down now is retried on demand
        upstream_gate = UpstreamGate(
            settings.liveness_proxy_upstream_concurrency,
            wait_seconds=settings.liveness_proxy_upstream_queue_timeout_seconds,
            on_reject=metrics.upstream_slot_rejected,
        )
        metrics.watch_upstream_gate(lambda: upstream_gate.in_flight, lambda: upstream_gate.waiting)
        audit = AuditLog(
            engine, batch_max=settings.liveness_proxy_audit_batch_max, on_commit=metrics.audit_committed
        )
        # Closed before the token manager and the pools: its last batch is written on close.
        opened.push_async_callback(audit.close)
        ownership = SessionOwnership(engine)
        opened.push_async_callback(ownership.close)
        yield Service(
            engine=engine,
            tokens=tokens,
            cynopsis=cynopsis,
            ownership=ownership,
            audit=audit,
            authentication=CallerAuthentication(authenticators),
            biometrics=BiometricFilter(
                settings.liveness_proxy_biometric_fields,
                enabled=settings.liveness_proxy_strip_biometrics,
                allow_fields=settings.liveness_proxy_biometric_allow_fields,
                max_string_bytes=settings.liveness_proxy_biometric_max_string_bytes,
            ),
            limits=SubjectLimits(
                limit_policy(settings),
                shared=(
                    None
                    if redis is None
                    else redis_limit_storage(redis, key_prefix=settings.liveness_proxy_redis_key_prefix)
                ),
                wall_clock=wall_clock,
                on_reject=metrics.rate_limited,
                on_storage_failure=shared_state_failed("rate_limits"),
            ),
            upstream_gate=upstream_gate,
            metrics=metrics,
            logger=logger,
            wall_clock=wall_clock,
            client_secret=client_secret,
            redis=redis,
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
    http: aiohttp.ClientSession,
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
    files towards Cynopsis, the JWT set-up and its key file. `serve` calls it before it binds a
    port, so that each of these ends the command with one line instead of a failed start per worker."""
    settings.require_proxy_secrets()
    cynopsis_ssl_context(settings)
    policy = checked_jwt_policy(settings)
    key_file = settings.liveness_proxy_jwt_public_key_file
    if policy is not None and key_file is not None:
        try:
            load_public_key_file(key_file, policy.algorithms)
        except PublicKeyFileError as exc:
            raise ConfigurationError(f"LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE: {exc}") from None

"""The parts a running proxy is made of, built once per app at start-up and closed at shutdown."""

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
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.auth import (
    ApiKeyAuthenticator,
    Authenticator,
    CallerAuthentication,
    JwtAuthenticator,
    jwt_authenticator_from_settings,
)
from liveness_proxy.http import Http1Transport, HttpTransport
from liveness_proxy.metrics import ProxyMetrics
from liveness_proxy.observability import Redactor
from liveness_proxy.privacy import BiometricFilter
from liveness_proxy.ratelimit import LimitPolicy, SubjectLimits, UpstreamGate, redis_limit_storage
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
)
from liveness_proxy.upstream.circuit import CircuitBreaker
from liveness_proxy.upstream.client_secret import ClientSecretSource
from liveness_proxy.upstream.tls import upstream_ssl_context


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


@dataclass(slots=True)
class Runtime:
    settings: Settings
    engine: AsyncEngine
    http: Http1Transport  # the token endpoint: rare calls (Cynopsis' TLS context)
    liveness_http: Http1Transport  # the three liveness calls: every request's path
    tokens: TokenManager
    cynopsis: CynopsisClient
    ownership: SessionOwnership
    audit: AuditLog
    api_keys: ApiKeyStore
    authentication: CallerAuthentication
    biometrics: BiometricFilter
    limits: SubjectLimits
    upstream_gate: UpstreamGate
    metrics: ProxyMetrics
    jwt: JwtAuthenticator | None
    logger: structlog.typing.FilteringBoundLogger
    wall_clock: Callable[[], float]
    client_secret: ClientSecretSource
    redis: aioredis.Redis | None = None
    jwks_http: Http1Transport | None = None  # the identity provider's JWKS (the system's trust store)

    async def ping_store(self) -> None:
        await ping(self.engine)

    async def ping_redis(self) -> None:
        if self.redis is not None:
            await self.redis.ping()

    async def close(self) -> None:
        await self.ownership.close()
        await self.audit.close()
        if self.jwt is not None:
            await self.jwt.close()
        await self.tokens.close()
        await self.http.aclose()
        if self.jwks_http is not None:
            await self.jwks_http.aclose()
        await self.liveness_http.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        await self.engine.dispose()


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
    )


async def start_runtime(
    settings: Settings,
    *,
    logger: structlog.typing.FilteringBoundLogger,
    redactor: Redactor,
    metrics: ProxyMetrics,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    shared_clock: Callable[[], float] = time.time,
    migrate: bool = False,
) -> Runtime:
    """Builds every part from settings. `clock` drives token, cache and JWKS expiry (monotonic by
    default); `wall_clock` stamps records and checks JWT times; `shared_clock` (a wall clock: it must
    agree across machines) dates the token shared with other processes."""
    settings.require_proxy_secrets()
    # First: a bad certificate or key file stops start-up before anything is opened.
    upstream_tls = cynopsis_ssl_context(settings)
    engine = create_engine(settings.database_url, pool=settings.database_pool)
    redis = create_redis(settings)
    if migrate:
        # On an engine of its own: the serving engine's statement timeout (a bounded wait on a lock,
        # then 503) must not cut a migration that waits for another replica's or rewrites a table.
        migration_engine = create_engine(settings.database_url, pool_size=1)
        try:
            await upgrade_database(migration_engine)
        finally:
            await migration_engine.dispose()
    # Three transports, as three pools of connections: the token request never waits behind busy
    # liveness calls, a token endpoint's TLS failure is logged as a token failure only, and the
    # JWKS is verified with the system's trust store, never with the Cynopsis one.
    http = Http1Transport(
        max_connections=settings.cynopsis_max_connections,
        connect_timeout_seconds=settings.cynopsis_connect_timeout_seconds,
        ssl_context=upstream_tls,
    )
    jwks_http = Http1Transport(
        max_connections=settings.cynopsis_max_connections,
        connect_timeout_seconds=settings.cynopsis_connect_timeout_seconds,
    )

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
        token_fetcher(http, settings, client_secret=client_secret),
        refresh_margin=settings.token_refresh_margin,
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
    endpoints = CynopsisEndpoints(
        api_base_url=settings.cynopsis_api_base_url,
        session_token_path=settings.cynopsis_session_token_path,
        session_path=settings.cynopsis_session_path,
        result_path=settings.cynopsis_result_path,
    )
    liveness_http = Http1Transport(
        max_connections=settings.cynopsis_max_connections,
        connect_timeout_seconds=settings.cynopsis_connect_timeout_seconds,
        ssl_context=upstream_tls,
        on_tls_failure=log_tls_failure,
    )
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
    api_keys = ApiKeyStore(engine)
    authenticators: list[Authenticator] = [
        ApiKeyAuthenticator(
            api_keys,
            pepper=settings.liveness_proxy_api_key_pepper.get_secret_value().encode(),
            cache_seconds=settings.liveness_proxy_api_key_cache_seconds,
            clock=clock,
        )
    ]

    def log_jwks_failure(reason: str) -> None:
        logger.warning("jwks_fetch_failed", reason=reason)

    jwt = jwt_authenticator_from_settings(
        settings, http=jwks_http, clock=clock, wall_clock=wall_clock, on_jwks_failure=log_jwks_failure
    )
    if jwt is not None:
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
        authenticators.append(jwt)
        await jwt.start()  # best effort: a JWKS host that is down now is retried on demand
    authentication = CallerAuthentication(authenticators)
    upstream_gate = UpstreamGate(
        settings.liveness_proxy_upstream_concurrency,
        wait_seconds=settings.liveness_proxy_upstream_queue_timeout_seconds,
        on_reject=metrics.upstream_slot_rejected,
    )
    metrics.watch_upstream_gate(lambda: upstream_gate.in_flight, lambda: upstream_gate.waiting)
    return Runtime(
        settings=settings,
        engine=engine,
        http=http,
        liveness_http=liveness_http,
        tokens=tokens,
        cynopsis=cynopsis,
        ownership=SessionOwnership(engine),
        audit=AuditLog(
            engine, batch_max=settings.liveness_proxy_audit_batch_max, on_commit=metrics.audit_committed
        ),
        api_keys=api_keys,
        authentication=authentication,
        biometrics=BiometricFilter(
            settings.liveness_proxy_biometric_fields,
            enabled=settings.liveness_proxy_strip_biometrics,
            allow_fields=settings.liveness_proxy_biometric_allow_fields,
            max_string_bytes=settings.liveness_proxy_biometric_max_string_bytes,
        ),
        limits=SubjectLimits(
            LimitPolicy(
                session_token=settings.liveness_proxy_rate_limit_session_token,
                create_session=settings.liveness_proxy_rate_limit_create_session,
                result=settings.liveness_proxy_rate_limit_result,
                daily_attempts=settings.liveness_proxy_daily_attempts,
            ),
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
        jwt=jwt,
        logger=logger,
        wall_clock=wall_clock,
        client_secret=client_secret,
        redis=redis,
        jwks_http=jwks_http,
    )

"""The running service: every part built from settings at start-up, and closed at shutdown."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.auth import (
    ApiKeyAuthenticator,
    Authenticator,
    CallerAuthentication,
)
from liveness_proxy.auth.session_tokens import KeyedHash, SessionTokenBinding
from liveness_proxy.background import (
    BackgroundWorker,
    Finalizer,
    FinalizerSchedule,
    JobRunner,
    RetrySchedule,
    WebhookDeliveries,
)
from liveness_proxy.background.erasure import ErasureFollowUp
from liveness_proxy.background.retention import RetentionSweeper, SweepSchedule
from liveness_proxy.delivery import VerdictEvents, WebhookSender
from liveness_proxy.http import Http1Transport
from liveness_proxy.metrics import ProxyMetrics
from liveness_proxy.middleware import new_request_id
from liveness_proxy.observability import Redactor
from liveness_proxy.privacy import BiometricFilter
from liveness_proxy.ratelimit import AddressGate, SubjectLimits, UpstreamGate, redis_limit_storage
from liveness_proxy.settings import Settings
from liveness_proxy.store import (
    ApiKeyStore,
    AuditLog,
    DeliveryRecorder,
    JobQueue,
    SessionOwner,
    SessionOwnership,
    VerdictLedger,
    WebhookOutbox,
    create_engine,
    ping,
    upgrade_database,
)
from liveness_proxy.store.audit_checkpoints import CheckpointWriter
from liveness_proxy.store.erasure import Erasure, ErasureNotices, RedisKeys
from liveness_proxy.store.failed_authentications import FailedAuthentications
from liveness_proxy.store.idempotency import IdempotencyRecords
from liveness_proxy.store.retention import Retention
from liveness_proxy.store.session_tokens import (
    DatabaseSessionTokens,
    RedisSessionTokens,
    SessionTokenLedger,
)
from liveness_proxy.store.subjects import SubjectRegistry
from liveness_proxy.store.verdicts import verdict_of
from liveness_proxy.store.write_batch import BatchedWrites
from liveness_proxy.tracing import Tracing
from liveness_proxy.upstream import (
    CynopsisClient,
    CynopsisEndpoints,
    DatabaseTokenStore,
    RedisTokenStore,
    ShapedResult,
    SharedTokenPolicy,
    SingleFlight,
    TokenEndpointError,
    TokenManager,
    TokenStore,
)
from liveness_proxy.upstream.circuit import CircuitBreaker
from liveness_proxy.upstream.client_secret import ClientSecretSource
from liveness_proxy.webhook_signing import parse_webhook_secrets
from liveness_proxy.wiring.options import (
    audit_checkpoint_options,
    limit_policy,
    pool_options,
    retention_options,
    token_refresh_margin,
    unauthenticated_limit_policy,
)
from liveness_proxy.wiring.parts import (
    CircuitSignals,
    client_secret_source,
    create_redis,
    cynopsis_ssl_context,
    jwt_authenticator,
    privacy_keys,
    token_cipher,
    token_fetcher,
    warn_if_jwt_claims_unchecked,
)

# Client addresses counted (and blocked) at once per process for the unauthenticated limit: about
# 35 MB of counters at most under a flood from rotating addresses.
MAX_COUNTED_ADDRESSES = 100_000


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
    verdicts: VerdictLedger
    outbox: WebhookOutbox
    background: BackgroundWorker
    hashes: KeyedHash  # keyed hashes of session tokens and subjects (never stored in clear)
    session_tokens: SessionTokenBinding
    idempotency: IdempotencyRecords
    # Before authentication: the per-address limit on failures, and their aggregate audit records.
    address_gate: AddressGate
    failed_authentications: FailedAuthentications
    # Per-subject secrets and commitments; erasure.
    subjects: SubjectRegistry
    erasure: Erasure
    tracing: Tracing
    # Result reads of one session share one Cynopsis call, and reuse its answer briefly
    # (api/result_reads.py); emptied by an erasure.
    result_flights: SingleFlight[str, ShapedResult]

    async def record_read(
        self,
        owner: SessionOwner,
        payload: dict[str, Any],
        request_id: str,
        *,
        final_result: str | None = None,
    ) -> SessionOwner:
        """A caller's (or an admin's refresh) read of a session's result: a terminal status is the
        verdict unless one is stored (the finalizer then stops following the session, and the
        webhook goes out at once), written with `final_result`, the answer the caller is given
        (api/final_results.py). Returns the binding with the verdict that stands."""
        if owner.verdict is not None:
            return owner
        verdict = verdict_of(payload, recorded_at=self.wall_clock(), request_id=request_id)
        if verdict is None:
            return owner
        stored = await self.verdicts.record(owner, verdict, read_by="request", final_result=final_result)
        self.background.wake()
        return stored

    async def ping_store(self) -> None:
        await ping(self.engine)

    async def ping_redis(self) -> None:
        if self.redis is not None:
            await self.redis.ping()


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
    tracing: Tracing | None = None,
) -> AsyncIterator[Service]:
    """Builds every part from settings, and closes everything it opened, in reverse order, however
    the block ends, a failure halfway through start-up included.

    `clock` drives token, cache and JWKS expiry (monotonic by default); `wall_clock` stamps records
    and checks JWT times; `shared_clock` (a wall clock: it must agree across machines) dates the
    token shared with other processes."""
    settings.require_proxy_secrets()
    tracing = tracing or Tracing.off()
    # First: a bad certificate or key file stops start-up before anything is opened.
    upstream_tls = cynopsis_ssl_context(settings)
    keys = privacy_keys(settings)
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
                await upgrade_database(migration_engine, keys=keys)
            finally:
                await migration_engine.dispose()

        # --- Signed audit checkpoints (store/audit_checkpoints.py) --------------------------------
        # Opened here, right after the engine, so that it closes after everything that writes audit
        # records (the exit stack runs in reverse): its last checkpoint covers the last batch.
        checkpoints = audit_checkpoint_options(settings)
        if checkpoints is not None:
            checkpoint_writer = CheckpointWriter(
                engine,
                checkpoints.signer,
                logger=logger,
                interval_seconds=checkpoints.interval_seconds,
                path=checkpoints.file,
                wall_clock=wall_clock,
            )
            checkpoint_writer.start()
            opened.push_async_callback(checkpoint_writer.close)
        # --- end of signed audit checkpoints ------------------------------------------------------

        # Three transports, as three pools of connections: the token request never waits behind
        # busy liveness calls, a token endpoint's TLS failure is logged as a token failure only, and
        # the JWKS is verified with the system's trust store, never with the Cynopsis one.
        http = Http1Transport(
            max_connections=settings.cynopsis_max_connections,
            connect_timeout_seconds=settings.cynopsis_connect_timeout_seconds,
            ssl_context=upstream_tls,
        )
        opened.push_async_callback(http.aclose)
        jwks_http = Http1Transport(
            max_connections=settings.cynopsis_max_connections,
            connect_timeout_seconds=settings.cynopsis_connect_timeout_seconds,
        )
        opened.push_async_callback(jwks_http.aclose)

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
            token_fetcher(http, settings, client_secret=client_secret, tracing=tracing),
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
            tracing=tracing,
        )
        opened.push_async_callback(tokens.close)
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
        opened.push_async_callback(liveness_http.aclose)
        cynopsis = CynopsisClient(
            liveness_http,
            tokens,
            session_id_fields=settings.cynopsis_session_id_fields,
            # No answer may hold the client secret (the access token is checked per call).
            own_secrets=lambda: (client_secret.current(),),
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
            tracing=tracing,
        )

        def log_key_use_not_recorded(error: BaseException) -> None:
            # The class name only: a driver's message may quote the URL, password included.
            logger.warning("api_key_use_not_recorded", error=type(error).__name__)

        api_keys = ApiKeyAuthenticator(
            ApiKeyStore(engine),
            pepper=settings.liveness_proxy_api_key_pepper.get_secret_value().encode(),
            cache_seconds=settings.liveness_proxy_api_key_cache_seconds,
            clock=clock,
            wall_clock=wall_clock,
            on_use_not_recorded=log_key_use_not_recorded,
        )
        # Before the engine closes: the last uses are written on close.
        opened.push_async_callback(api_keys.close)
        authenticators: list[Authenticator] = [api_keys]

        def log_jwks_failure(reason: str) -> None:
            logger.warning("jwks_fetch_failed", reason=reason)

        jwt = jwt_authenticator(
            settings, http=jwks_http, clock=clock, wall_clock=wall_clock, on_jwks_failure=log_jwks_failure
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
        result_flights: SingleFlight[str, ShapedResult] = SingleFlight(
            reuse_seconds=settings.liveness_proxy_result_reuse_seconds,
            clock=clock,
        )
        audit = AuditLog(
            engine,
            keys.audit,
            batch_max=settings.liveness_proxy_audit_batch_max,
            on_commit=metrics.audit_committed,
        )
        # Closed before the token manager and the pools: its last batch is written on close.
        opened.push_async_callback(audit.close)
        schedule = FinalizerSchedule(
            offsets=tuple(settings.liveness_proxy_finalizer_schedule),
            deadline_seconds=settings.liveness_proxy_finalizer_deadline_seconds,
        )
        finalizer_on = settings.liveness_proxy_finalizer
        ownership = SessionOwnership(
            engine, first_followup_seconds=schedule.first_offset if finalizer_on else None
        )
        opened.push_async_callback(ownership.close)
        webhook_url = settings.liveness_proxy_webhook_url
        verdicts = VerdictLedger(
            engine,
            ownership,
            keys.audit,
            events=VerdictEvents(pass_threshold=settings.liveness_proxy_pass_threshold)
            if webhook_url
            else None,
            wall_clock=wall_clock,
            first_delivery_delay=settings.liveness_proxy_webhook_retry_schedule[0],
        )
        opened.push_async_callback(verdicts.close)
        outbox = WebhookOutbox(engine)
        queue = JobQueue(engine)
        runners: list[JobRunner] = []
        if finalizer_on:
            runners.append(
                Finalizer(
                    queue=queue,
                    ownership=ownership,
                    ledger=verdicts,
                    cynopsis=cynopsis,
                    schedule=schedule,
                    concurrency=settings.liveness_proxy_finalizer_concurrency,
                    wall_clock=wall_clock,
                    metrics=metrics,
                    logger=logger,
                )
            )
        if webhook_url:
            webhook_keys = parse_webhook_secrets(settings.liveness_proxy_webhook_secret.get_secret_value())
            for key in settings.liveness_proxy_webhook_secret.get_secret_value().split():
                redactor.add_secret(key, permanent=True)
            # A pool of its own: a slow receiver never holds a connection the liveness calls need,
            # and the receiver's certificate is checked against the system's trust store.
            webhook_http = Http1Transport(
                max_connections=settings.liveness_proxy_webhook_concurrency,
                connect_timeout_seconds=min(settings.liveness_proxy_webhook_timeout_seconds, 10.0),
            )
            opened.push_async_callback(webhook_http.aclose)
            recorder = DeliveryRecorder(engine, keys.audit)
            opened.push_async_callback(recorder.close)
            runners.append(
                WebhookDeliveries(
                    outbox=outbox,
                    recorder=recorder,
                    sender=WebhookSender(
                        webhook_http,
                        webhook_url,
                        keys=webhook_keys,
                        timeout_seconds=settings.liveness_proxy_webhook_timeout_seconds,
                        wall_clock=wall_clock,
                        tracing=tracing,
                    ),
                    schedule=RetrySchedule(tuple(settings.liveness_proxy_webhook_retry_schedule)),
                    concurrency=settings.liveness_proxy_webhook_concurrency,
                    wall_clock=wall_clock,
                    metrics=metrics,
                    logger=logger,
                )
            )

        subjects = SubjectRegistry(engine, keys.subjects, wall_clock=wall_clock)
        hashes = KeyedHash(settings.liveness_proxy_api_key_pepper.get_secret_value().encode())
        authentication = CallerAuthentication(authenticators)

        def forget_subjects() -> None:
            # Every cache that holds a plain subject, emptied after an erasure (here or elsewhere).
            subjects.forget_all()
            ownership.forget_all()
            authentication.forget_all()
            # A reused answer may be of an erased session; the owner check before it is gone too.
            result_flights.forget_all()

        erasure = Erasure(
            engine,
            subjects,
            keys.audit,
            binding_hash=hashes.subject,
            wall_clock=wall_clock,
            redis=None if redis is None else RedisKeys(redis, settings.liveness_proxy_redis_key_prefix),
            on_erased=forget_subjects,
        )
        runners.append(ErasureFollowUp(queue=queue, erasure=erasure, wall_clock=wall_clock))

        # Retention (store/retention.py, background/retention.py): always registered, even with both
        # retention settings at 0, because the sweep also removes what has no setting of its own:
        # erasure notices older than a day, expired idempotency records and session-token bindings.
        retention = retention_options(settings)
        runners.append(
            RetentionSweeper(
                engine=engine,
                queue=queue,
                retention=Retention(engine, keys.audit, policy=retention.policy, wall_clock=wall_clock),
                schedule=SweepSchedule(retention.interval_seconds, retention.time_budget_seconds),
                wall_clock=wall_clock,
                metrics=metrics,
                logger=logger,
            )
        )
        notices = ErasureNotices(engine, forget_subjects)

        async def sample_backlog() -> None:
            metrics.jobs_counted(
                await queue.counts(), endpoint_disabled=await outbox.endpoint_disabled_at() is not None
            )

        background = BackgroundWorker(
            queue,
            runners,
            lease_seconds=settings.worker_lease_seconds,
            interval_seconds=settings.liveness_proxy_worker_interval_seconds,
            wall_clock=wall_clock,
            logger=logger,
            on_pass=sample_backlog,
            on_every_pass=notices.poll,  # every pass: an erasure reaches each process within an interval
            tracing=tracing,
            # Long enough for a delivery in flight to end, within the operator's shutdown budget: a
            # cut one is released at once, but it may then arrive twice (same webhook-id).
            grace_seconds=min(
                settings.liveness_proxy_shutdown_timeout_seconds,
                settings.liveness_proxy_webhook_timeout_seconds,
            ),
        )
        # One writer for the small writes requests wait on (token bindings, idempotency claims):
        # closed after everything that submits to it.
        integrity_writes = BatchedWrites(engine)
        opened.push_async_callback(integrity_writes.close)
        session_token_ledger: SessionTokenLedger = (
            DatabaseSessionTokens(integrity_writes)
            if redis is None
            else RedisSessionTokens(redis, key_prefix=settings.liveness_proxy_redis_key_prefix)
        )
        limits_storage = (
            None
            if redis is None
            else redis_limit_storage(redis, key_prefix=settings.liveness_proxy_redis_key_prefix)
        )
        limits = SubjectLimits(
            limit_policy(settings),
            shared=limits_storage,
            wall_clock=wall_clock,
            on_reject=metrics.rate_limited,
            on_storage_failure=shared_state_failed("rate_limits"),
        )
        metrics.watch_daily_attempts_total(lambda: limits.attempts_total_used_ratio)
        # Written before the audit log closes (closed in reverse order of opening).
        failed_authentications = FailedAuthentications(
            audit,
            logger=logger,
            new_request_id=new_request_id,
            wall_clock=wall_clock,
            on_failure=metrics.authentication_failed,
            answer_delay_seconds=settings.liveness_proxy_failed_auth_delay_seconds,
        )
        opened.push_async_callback(failed_authentications.flush)
        # Closed before the transports, the verdict ledger and the audit log its calls use.
        opened.push_async_callback(result_flights.close)
        # Last in, so first out: the worker stops before the store and the transports it uses close.
        background.start()
        opened.push_async_callback(background.close)
        yield Service(
            engine=engine,
            tokens=tokens,
            cynopsis=cynopsis,
            ownership=ownership,
            audit=audit,
            authentication=authentication,
            biometrics=BiometricFilter(
                settings.liveness_proxy_biometric_fields,
                enabled=settings.liveness_proxy_strip_biometrics,
                allow_fields=settings.liveness_proxy_biometric_allow_fields,
                max_string_bytes=settings.liveness_proxy_biometric_max_string_bytes,
            ),
            limits=limits,
            upstream_gate=upstream_gate,
            metrics=metrics,
            logger=logger,
            wall_clock=wall_clock,
            client_secret=client_secret,
            redis=redis,
            verdicts=verdicts,
            outbox=outbox,
            background=background,
            hashes=hashes,
            session_tokens=SessionTokenBinding(
                session_token_ledger,
                hashes,
                enabled=settings.liveness_proxy_session_token_binding,
                wall_clock=wall_clock,
            ),
            idempotency=IdempotencyRecords(integrity_writes),
            # Its own counters: keyed by client addresses, which a flood rotates, so bounded in memory.
            address_gate=AddressGate(
                SubjectLimits(
                    unauthenticated_limit_policy(settings),
                    shared=limits_storage,
                    wall_clock=wall_clock,
                    on_reject=metrics.rate_limited,
                    # It fails over like the subject limits (same Redis), which report the outage
                    # once: a second report of the same outage would read as two.
                    local_max_keys=MAX_COUNTED_ADDRESSES,
                ),
                clock=clock,
                max_blocked=MAX_COUNTED_ADDRESSES,
                on_reject=metrics.rate_limited,
            ),
            failed_authentications=failed_authentications,
            subjects=subjects,
            erasure=erasure,
            tracing=tracing,
            result_flights=result_flights,
        )

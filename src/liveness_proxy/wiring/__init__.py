"""The wiring: the one layer that reads `Settings`, builds every part from it, and closes them.

`running_service(settings, ...)` is an async context manager around an `AsyncExitStack`: whatever
fails during start-up or shutdown, everything that was opened is closed, in reverse order.
`options` turns the settings into the small option objects the parts and the app take.
"""

from liveness_proxy.wiring.options import (
    AppOptions,
    AuditCheckpointOptions,
    RequestPolicy,
    ServeOptions,
    app_options,
    audit_checkpoint_options,
    final_result_store_line,
    request_policy,
    serve_options,
    tracing_options,
)
from liveness_proxy.wiring.parts import check_startable, create_redis, cynopsis_ssl_context, token_fetcher
from liveness_proxy.wiring.service import Service, running_service

__all__ = [
    "AppOptions",
    "AuditCheckpointOptions",
    "RequestPolicy",
    "ServeOptions",
    "Service",
    "app_options",
    "audit_checkpoint_options",
    "check_startable",
    "create_redis",
    "cynopsis_ssl_context",
    "final_result_store_line",
    "request_policy",
    "running_service",
    "serve_options",
    "token_fetcher",
    "tracing_options",
]

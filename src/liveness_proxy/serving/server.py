"""`liveness-proxy serve`: uvicorn with our protocol, TLS, and the served app, in one or N workers."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from liveness_proxy.serving.forwarders import TrustedForwarders
from liveness_proxy.serving.protocol import ServeLimits, protocol_class
from liveness_proxy.serving.sockets import bound_sockets
from liveness_proxy.serving.tls import TlsFiles, check_tls_files, tls_files
from liveness_proxy.settings import Settings
from liveness_proxy.wiring import ServeOptions, check_startable, serve_options

# The exit status of a serve whose application did not start (uvicorn uses the same).
EXIT_NOT_STARTED = 3


def uvicorn_options(options: ServeOptions, tls: TlsFiles | None) -> dict[str, Any]:
    """The uvicorn settings that bound what clients may hold, and TLS; shared by every worker."""
    uvicorn_settings: dict[str, Any] = {
        "http": protocol_class(ServeLimits.from_options(options)),
        "timeout_keep_alive": options.keepalive_timeout_seconds,
        "timeout_graceful_shutdown": options.shutdown_timeout_seconds,
        # No WebSocket routes: an Upgrade request is served as plain HTTP (and refused by routing).
        "ws": "none",
    }
    if tls is not None:
        uvicorn_settings["ssl_certfile"] = str(tls.cert_file)
        uvicorn_settings["ssl_keyfile"] = str(tls.key_file)
    return uvicorn_settings


def served_app_from_environment() -> object:
    """The app factory uvicorn's workers call (`serve --workers N`): each worker reads the same settings."""
    from liveness_proxy.app import create_app
    from liveness_proxy.serving.process import ServedApp

    settings = Settings.load()
    return TrustedForwarders(ServedApp(create_app(settings)), settings.forwarded_allow_ips)


def serve(
    settings: Settings,
    *,
    host: str,
    port: int,
    workers: int,
    ssl_certfile: str | None,
    ssl_keyfile: str | None,
    prepare: Callable[[], None] = lambda: None,
) -> int:
    """Checks everything that can be checked before a socket is opened (each failure is one
    ConfigurationError line for the CLI), binds the port (a taken one is one StartRefused line),
    runs `prepare` (the migrations, once for all workers), then runs uvicorn until SIGTERM/SIGINT."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from liveness_proxy.app import create_app
    from liveness_proxy.serving.process import ServedApp

    options = serve_options(settings)
    tls = tls_files(options, ssl_certfile, ssl_keyfile)
    if tls is not None:
        # Before anything else: a wrong certificate is a configuration error, not a crash per worker.
        check_tls_files(tls)
    # Likewise the secrets, the JWT set-up and the CA bundle and client certificate towards Cynopsis.
    check_startable(settings)
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "loop": "uvloop",
        # On: a lifespan that fails ends the process (with "auto", uvicorn would serve on without it).
        "lifespan": "on",
        "access_log": False,  # our own access log is structured and redacted
        # Forwarded headers are ours to apply (TrustedForwarders), with the same FORWARDED_ALLOW_IPS.
        "proxy_headers": False,
        "server_header": False,
        "log_level": "warning",
        # The httptools protocol with head deadline, head size and connection limits (protocol.py),
        # keep-alive, graceful shutdown and TLS.
        **uvicorn_options(options, tls),
    }
    # Bound first, listening only once uvicorn serves: a taken port is one line, before the
    # migrations or the service run, and nobody connects to a port that cannot answer yet.
    with bound_sockets(host, port, "--port") as sockets:
        prepare()
        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown so that the default handler
        # kills the process; a drained, cleanly stopped server should exit 0 instead. (After the
        # migrations: an interrupted migration is not a clean stop.)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _exit_cleanly)
        if workers > 1:
            config = uvicorn.Config(
                "liveness_proxy.serving.server:served_app_from_environment",
                factory=True,
                workers=workers,
                **common,
            )
            # What `uvicorn.run` does for workers, with our sockets instead of one it binds itself.
            Multiprocess(config, sockets=sockets).run()
            return 0
        app = TrustedForwarders(ServedApp(create_app(settings)), settings.forwarded_allow_ips)
        server = uvicorn.Server(uvicorn.Config(app, **common))
        server.run(sockets=sockets)
        return 0 if server.started else EXIT_NOT_STARTED


def _exit_cleanly(_signum: int, _frame: object) -> None:
    sys.exit(0)

"""`serve`: the proxy itself (uvicorn and the app are imported only here, when it runs)."""

from __future__ import annotations

import argparse
import asyncio

from liveness_proxy.cli.db import upgrade_schema
from liveness_proxy.settings import Settings


def cmd_serve(args: argparse.Namespace) -> int:
    from liveness_proxy.serving import serve

    settings = Settings.load()
    host = args.host or settings.liveness_proxy_host
    port = settings.liveness_proxy_port if args.port is None else args.port
    return serve(
        settings,
        host=host,
        port=port,
        workers=args.workers,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        # Migrations run once here, not in each worker, so workers never race on the schema.
        prepare=lambda: asyncio.run(upgrade_schema(settings)),
    )

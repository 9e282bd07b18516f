"""`sandbox` and `demo`: the simulated Cynopsis API, alone or with a proxy and a demo key."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys


def cmd_sandbox(args: argparse.Namespace) -> int:
    from liveness_proxy.sandbox import SandboxConfig, serve_sandbox
    from liveness_proxy.sandbox.local_only import hosts_to_answer

    # The control API answers under loopback names and the one it listens on; on every address,
    # under any name, which anyone who reaches it can then use.
    control_hosts = hosts_to_answer(args.host)
    if args.control and control_hosts is None:
        print(
            f"warning: the sandbox listens on {args.host or 'every address'} with its control API on: "
            "anyone who reaches it can drive it. Keep it on a trusted network.",
            file=sys.stderr,
        )
    config = SandboxConfig(
        client_id=args.client_id,
        client_secret=args.client_secret,
        domain_id=args.domain_id,
        control_enabled=args.control,
        control_hosts=control_hosts,
    )
    print(
        f"sandbox Cynopsis API on http://{args.host}:{args.port} "
        f"(client_id={args.client_id}, domain={args.domain_id}, "
        f"control API {'on' if args.control else 'off'})",
        file=sys.stderr,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_sandbox(config, args.host, args.port))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from liveness_proxy.demo import run_demo

    try:
        return asyncio.run(
            run_demo(
                directory=args.dir,
                host=args.host,
                port=args.port,
                sandbox_port=args.sandbox_port,
                walkthrough_only=args.walkthrough_only,
            )
        )
    except KeyboardInterrupt:
        return 0

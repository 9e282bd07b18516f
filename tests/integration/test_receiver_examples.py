"""The webhook receivers shown in docs/integration.md (Python with `standardwebhooks`, Node.js with
its standard library) accept our real deliveries, refuse forged or stale ones, and see a retry as a
duplicate."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from liveness_proxy.delivery import WebhookSender
from liveness_proxy.delivery.events import event_body, new_event_id
from liveness_proxy.http import Http1Transport
from liveness_proxy.webhook_signing import new_webhook_secret, parse_webhook_secrets
from support import ServerThread

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = (ROOT / "docs" / "integration.md", ROOT / "README.md")
BODY = event_body(
    "liveness.session.completed",
    time.time(),
    {
        "session_id": "s-1",
        "subject": "alice",
        "reference": "loan-42",
        "status": "SUCCEEDED",
        "confidence": 97.5,
        "passed": True,
        "created_at": "2026-12-04T10:00:00.000Z",
        "completed_at": "2026-12-04T10:00:05.000Z",
    },
)


def example(document: Path, language: str) -> str:
    text = document.read_text(encoding="utf-8")
    match = re.search(rf"<!-- receiver:{language} -->\n```\w+\n(.*?)```", text, re.DOTALL)
    assert match, f"no {language} receiver in {document.name}"
    return match.group(1)


async def deliver(url: str, secret: str, event_id: str, *, clock: float | None = None) -> int | None:
    transport = Http1Transport(max_connections=2, connect_timeout_seconds=2)
    try:
        sender = WebhookSender(
            transport,
            url,
            keys=parse_webhook_secrets(secret),
            timeout_seconds=5,
            wall_clock=(lambda: clock) if clock is not None else time.time,
        )
        return (await sender.attempt(event_id, BODY)).status
    finally:
        await transport.aclose()


def exercise(url: str, secret: str) -> list[int | None]:
    event_id = new_event_id()
    return [
        asyncio.run(deliver(url, secret, event_id)),
        asyncio.run(deliver(url, secret, event_id)),  # a retry
        asyncio.run(deliver(url, new_webhook_secret(), new_event_id())),  # forged
        asyncio.run(deliver(url, secret, new_event_id(), clock=time.time() - 600)),  # stale
    ]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_the_python_receiver_example(document: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = new_webhook_secret()
    monkeypatch.setenv("LIVENESS_WEBHOOK_SECRET", secret)
    namespace: dict[str, Any] = {}
    exec(compile(example(document, "python"), str(document), "exec"), namespace)  # noqa: S102 (our own docs)
    server = ServerThread(namespace["app"], lifespan="off").start()
    try:
        answers = exercise(f"{server.url}/hooks/liveness", secret)
    finally:
        server.stop()
    assert answers == [204, 204, 400, 400]
    assert len(namespace["seen"]) == 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.skipif(shutil.which("node") is None and not os.environ.get("CI"), reason="no node binary")
@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_the_node_receiver_example(document: Path, tmp_path: Path) -> None:
    secret = f"{new_webhook_secret()} {new_webhook_secret()}"  # a rotation: either key verifies
    script = tmp_path / "receiver.js"
    script.write_text(example(document, "node"))
    port = _free_port()
    node = subprocess.Popen(
        ["node", str(script)],
        env={**os.environ, "LIVENESS_WEBHOOK_SECRET": secret, "PORT": str(port)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the node receiver did not start"
                time.sleep(0.05)
        answers = exercise(f"http://127.0.0.1:{port}/", secret.split()[1])
    finally:
        node.terminate()
        output, _ = node.communicate(timeout=10)
    assert answers == [204, 204, 400, 400]
    assert output.splitlines() == ["liveness.session.completed s-1 SUCCEEDED loan-42"]

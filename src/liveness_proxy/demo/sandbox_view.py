"""What the demo page shows of the sandbox: the upstream calls it received (credentials named, never
shown), and the values the leak check looks for in what the browser received."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from liveness_proxy.sandbox import Sandbox


def describe_upstream_call(
    method: str, path: str, headers: dict[str, str], sandbox: Sandbox
) -> dict[str, Any]:
    """One request the sandbox received, as the page shows it: which endpoint, with which
    credential, named but never shown."""
    config = sandbox.config
    authorization = headers.get("authorization", "")
    endpoint: str
    if path == config.token_path:
        endpoint = "token"
        credential = (
            "client_id + client_secret (HTTP Basic)"
            if authorization.lower().startswith("basic ")
            else "client_id + client_secret (form body)"
        )
    elif path.startswith("/_sandbox/"):
        endpoint = "sandbox_control"
        credential = "none (demo-only control API)"
    else:
        if path == config.session_token_path:
            endpoint = "session_token"
        elif path == config.session_path:
            endpoint = "liveness_session"
        elif path.startswith(config.result_path_prefix):
            endpoint = "liveness_result"
        else:
            endpoint = "other"
        credential = (
            "Bearer <Cynopsis access token>" if authorization.lower().startswith("bearer ") else "none"
        )
    request_id = headers.get("x-request-id")
    return {
        "method": method,
        "path": path,
        "endpoint": endpoint,
        "credential": credential,
        "domain_id": headers.get("x-domain-id"),
        "request_id": request_id,
        "asked_by": _asked_by(endpoint, request_id),
    }


def _asked_by(endpoint: str, request_id: str | None) -> str:
    """Who made the proxy call: with the finalizer on, the proxy also reads results on its own (its
    request ids start with `fin-`), so the panel shows reads the page did not ask for."""
    if endpoint == "token":
        return "the token manager"
    if endpoint == "sandbox_control":
        return "the demo (control)"
    if request_id is not None and request_id.startswith("fin-"):
        return "the finalizer"
    return "a caller's request"


def secrets_to_look_for(sandbox: Sandbox, client_secrets: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Every value that must never reach a browser, grouped under the label the page shows."""
    access_tokens = sorted(
        {
            header[len("bearer ") :]
            for recorded in sandbox.request_log
            if (header := recorded.headers.get("authorization", "")).lower().startswith("bearer ")
            and header[len("bearer ") :].strip()
        }
    )
    images = [image for session_id in sandbox.session_ids for image in sandbox.face_images(session_id)]
    return [
        ("the Cynopsis client secret", [value for value in client_secrets if value]),
        (f"{len(access_tokens)} Cynopsis access token(s)", access_tokens),
        (f"{len(images)} face image(s)", images),
    ]

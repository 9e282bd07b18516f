"""A simulated Cynopsis Liveness API, for tests and demos of the proxy.

It stands in for the third party, so it imports nothing from the rest of `liveness_proxy`. The
contract it simulates (from shared/upstream/cynopsis.md; the unpublished parts are assumptions):

- `POST /oauth/token`, form-encoded `grant_type=client_credentials`, `client_id`, `client_secret`:
  200 `{"access_token", "token_type": "Bearer", "expires_in", "scope"}`; 400 `invalid_request` /
  `unsupported_grant_type`; 401 `invalid_client`. Tokens are opaque and expire by the clock.
- The liveness endpoints need `Authorization: Bearer <token>` (else 401 `invalid_token` with
  `WWW-Authenticate`) and `X-Domain-Id` equal to the configured domain (else 403 `invalid_domain`):
  - `POST .../get_session_token`, JSON object body: `{"session_token", "expires_in"}`; the token is
    single-use.
  - `POST .../liveness_session`, `{"session_token"}`: `{"session_id", "status": "CREATED",
    "expires_in"}`; 400 unknown, 409 already used, 410 expired session token.
  - `GET .../liveness_result/{session_id}`: `{"session_id", "status", "confidence",
    "reference_image", "audit_images"}` with status CREATED, SUCCEEDED, FAILED or EXPIRED; 404 unknown.
- Errors are JSON `{"error", "message"?}`; request bodies over 1 MiB get 413.

Tests complete or expire sessions, revoke tokens, rotate the client secret, move a `ManualClock` and
inject `Fault`s through `Sandbox` methods, or through the `/_sandbox` HTTP control API when
`SandboxConfig.control_enabled` is set. Every request is kept in `Sandbox.request_log`.
"""

from liveness_proxy.sandbox.app import Sandbox, create_sandbox_app
from liveness_proxy.sandbox.clock import Clock, ManualClock, SystemClock
from liveness_proxy.sandbox.config import SandboxConfig
from liveness_proxy.sandbox.faults import Fault, FaultKind, FaultTarget
from liveness_proxy.sandbox.recording import RecordedRequest
from liveness_proxy.sandbox.server import running_sandbox, serve_sandbox

__all__ = [
    "Clock",
    "Fault",
    "FaultKind",
    "FaultTarget",
    "ManualClock",
    "RecordedRequest",
    "Sandbox",
    "SandboxConfig",
    "SystemClock",
    "create_sandbox_app",
    "running_sandbox",
    "serve_sandbox",
]

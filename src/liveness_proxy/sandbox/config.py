"""Settings of one simulated Cynopsis Liveness API instance."""

from __future__ import annotations

from dataclasses import dataclass, field

from liveness_proxy.sandbox.clock import Clock, SystemClock
from liveness_proxy.sandbox.local_only import LOOPBACK_HOSTS


@dataclass
class SandboxConfig:
    """Credentials, lifetimes and paths the sandbox answers with.

    The defaults follow the assumptions in the upstream notes (cynopsis.md). A `Sandbox` reads the
    paths once, when it builds its routes, and works on its own copy of the rest.
    """

    client_id: str = "sandbox-client"
    client_secret: str = "sandbox-secret"
    domain_id: str = "sandbox-domain"
    # None makes the token response omit expires_in, as upstream may; such tokens live 3600 s.
    token_lifetime_seconds: int | None = 28800
    session_token_lifetime_seconds: int = 300
    session_lifetime_seconds: int = 180
    # The /_sandbox control API is a back door; it must be asked for explicitly.
    control_enabled: bool = False
    # The Host names the control API answers under (None: any). Loopback only by default, so that
    # a web page whose name is rebound to 127.0.0.1 cannot drive it (see local_only.py).
    control_hosts: frozenset[str] | None = LOOPBACK_HOSTS
    # S105 mistakes these paths for passwords because their names contain "token".
    token_path: str = "/oauth/token"
    session_token_path: str = "/service/liveness-v2/get_session_token"
    session_path: str = "/service/liveness-v2/liveness_session"
    result_path_prefix: str = "/service/liveness-v2/liveness_result/"
    clock: Clock = field(default_factory=SystemClock)

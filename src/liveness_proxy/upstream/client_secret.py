"""The OAuth2 client secret, re-readable from `CYNOPSIS_CLIENT_SECRET_FILE` while the proxy runs.

Rotating the secret must not need a restart: Kubernetes and Docker update a mounted secret file in
place (Kubernetes by swapping a symlink, which is as atomic as a rename), so the file is read again
when the token endpoint refuses the client (`invalid_client`) and on SIGHUP. A secret given in
`CYNOPSIS_CLIENT_SECRET` itself cannot change while the process runs.

A file that cannot be read, or is empty, at a reload keeps the secret we have (the rotation may be
half-way: an empty file is what a careless `>` redirect leaves for a moment) and says so in the log,
with the reason only. The value is never logged; every value read is handed to `on_new_secret`
(the log redactor) before it is used anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog

# Far above any client secret; a bound so that a wrong path (a log file, a device) costs nothing.
MAX_SECRET_FILE_BYTES = 64 * 1024


class ClientSecretSource:
    """`current()` is the secret to send; `reload()` reads the file again (if there is one) and
    tells whether the secret changed."""

    def __init__(
        self,
        initial: str,
        *,
        path: Path | None,
        logger: structlog.typing.FilteringBoundLogger | None = None,
        on_new_secret: Callable[[str], None] | None = None,
    ) -> None:
        self._secret = initial
        self._path = path
        self._logger = logger
        self._on_new_secret = on_new_secret
        self.reloads = 0  # how many reads of the file were attempted (for tests and the curious)

    @property
    def reloadable(self) -> bool:
        return self._path is not None

    def current(self) -> str:
        return self._secret

    def reload(self, *, trigger: str = "request") -> bool:
        """Reads the file again; True if it now holds a different (non-empty) secret. `trigger`
        ("invalid_client", "sighup", ...) is only for the log line."""
        if self._path is None:
            return False
        self.reloads += 1
        try:
            fresh = _read_secret(self._path)
        except _Unusable as problem:
            if self._logger is not None:
                self._logger.warning(
                    "client_secret_reload_failed",
                    trigger=trigger,
                    reason=f"CYNOPSIS_CLIENT_SECRET_FILE: {problem}",
                    kept="the secret read before",
                )
            return False
        changed = fresh != self._secret
        if changed:
            if self._on_new_secret is not None:
                self._on_new_secret(fresh)  # the redactor learns it before any use
            self._secret = fresh
        if self._logger is not None:
            self._logger.info("client_secret_reloaded", trigger=trigger, changed=changed)
        return changed


class _Unusable(Exception):
    """Why a secret file gave no secret; the message never holds any of its content."""


def _read_secret(path: Path) -> str:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise _Unusable(f"cannot read the file ({exc.strerror})") from None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise _Unusable("the file is too large to hold a client secret")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _Unusable("the file is not UTF-8 text") from None
    if not text:
        raise _Unusable("the file is empty")
    return text

"""The paths of the liveness routes and the one definition of a valid session id.

The route table, the OpenAPI document, the `Location` header and the handlers' validation all take
them from here, so they cannot drift apart.
"""

from __future__ import annotations

import re
from typing import TypeGuard

# A path, not a password (bandit guesses from the name).
SESSION_TOKEN_PATH = "/v1/liveness/session-token"  # nosec B105
SESSIONS_PATH = "/v1/liveness/sessions"
SESSION_RESULT_PATH = "/v1/liveness/sessions/{session_id}/result"
SESSION_RECORD_PATH = "/v1/liveness/sessions/{session_id}"
# The subject goes in the body, never in the path: URLs end up in access logs and proxies' logs.
SUBJECT_ERASURE_PATH = "/v1/subjects/erase"

# 1-128 characters of A-Za-z0-9_-: no `/`, `.` or `%`, so an id can never address another upstream path.
SESSION_ID_REGEX = r"[A-Za-z0-9_-]{1,128}"
SESSION_ID_PATTERN = re.compile(SESSION_ID_REGEX)
SESSION_ID_RULE = "1-128 characters of A-Z, a-z, 0-9, '_' and '-'"


def session_result_location(root_path: str, session_id: str) -> str:
    """The result URL of a new session, under the host's prefix when mounted (library mode) or
    behind `--root-path`."""
    return root_path + SESSION_RESULT_PATH.format(session_id=session_id)


def is_session_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and SESSION_ID_PATTERN.fullmatch(value) is not None

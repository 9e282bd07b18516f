"""The stored copy of a terminal answer (`liveness_sessions.final_result`): its format and the
policy it was shaped under.

A session's verdict cannot change once recorded, so neither can the answer its caller is given. The
answer is stored exactly as a caller receives it after the declared-answer filter (api/declared.py):
the reduced payload, its session id normalised, `redacted_fields` included; but without `passed`,
which is derived when it is served from the threshold then configured. It is stored beside the
fingerprint of everything else that shaped it (the session-id fields, the extra response fields, the
image rules): an answer shaped under another policy is not served, and the next upstream read
replaces it.

The text is canonical JSON, `{"policy":"<fingerprint>","result":{...}}`, keys sorted: it begins with
`prefix`, by which the store's conditional UPDATE recognises a copy of another policy, and the result
is the text between the prefix and the last `}`, which is served as it is while no pass threshold is
set (no parsing on the way out).

Stored only while images are stripped and no image field is allowed through: a copy can never hold
an image (`Settings.final_result_store_inactive` says why it is off otherwise).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

import orjson

from liveness_proxy.privacy import derived_pass

# Our API keys, and a JWT's encoded header and payload (both begin with `{"`): see `encode`.
_CREDENTIAL_SHAPES = re.compile(r"lpk_[0-9a-f]{16}_|eyJ[A-Za-z0-9_-]{4,}\.eyJ")
# Bumped when the stored form changes: every copy of an older form is then replaced on its next read.
FORMAT_VERSION = 1


class FinalResults:
    """The stored form of terminal answers under one answer-shaping policy."""

    def __init__(
        self,
        *,
        session_id_fields: Iterable[str],
        extra_response_fields: Iterable[str],
        biometric_fields: Iterable[str],
        biometric_max_string_bytes: int,
        pass_threshold: float | None,
    ) -> None:
        policy = {
            "format": FORMAT_VERSION,
            "session_id_fields": list(session_id_fields),
            "extra_response_fields": sorted(extra_response_fields),
            "biometric_fields": sorted(biometric_fields),
            "biometric_max_string_bytes": biometric_max_string_bytes,
        }
        self.fingerprint = hashlib.sha256(orjson.dumps(policy, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
        self.prefix = f'{{"policy":"{self.fingerprint}","result":'
        self._pass_threshold = pass_threshold

    def encode(self, answer: dict[str, Any]) -> str | None:
        """The stored text of `answer` (the reduced payload without `passed`); None when it has no
        canonical form (then nothing is stored, and the session is read upstream as before)."""
        try:
            text = orjson.dumps(
                {"policy": self.fingerprint, "result": answer}, option=orjson.OPT_SORT_KEYS
            ).decode()
        except orjson.JSONEncodeError:
            return None
        if not text.startswith(self.prefix) or _CREDENTIAL_SHAPES.search(text) is not None:
            # A second line behind the check against the reader's own credentials: a copy at rest
            # never holds anything shaped like an API key or a JWT (it is then read upstream).
            return None
        return text

    def is_current(self, stored: str | None) -> bool:
        """Whether `stored` is a copy made under this policy."""
        return stored is not None and stored.startswith(self.prefix) and stored.endswith("}")

    def body(self, stored: str) -> bytes | None:
        """The answer body served from `stored` (with `passed` when a threshold is set); None when it
        is not a usable copy under this policy."""
        if not self.is_current(stored):
            return None
        result = stored[len(self.prefix) : -1]
        if self._pass_threshold is None:
            return result.encode()
        try:
            payload = orjson.loads(result)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(payload, dict):
            return None
        payload["passed"] = derived_pass(payload, self._pass_threshold)
        return orjson.dumps(payload)

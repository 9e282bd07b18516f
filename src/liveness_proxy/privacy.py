"""Biometric minimisation: face images never leave the proxy unless the operator asks for them.

A result is reduced to what a frontend needs (status, confidence, decision fields). Removed are:
the named biometric fields (deny list, any spelling, any depth), and any string that looks like
encoded binary data (base64 or a `data:` URI) longer than a small bound, whatever its field is
called, so a renamed or new image field upstream does not slip through. Fields on the allow list
are kept even if they look like binary data; the deny list wins over the allow list.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, TypeGuard

# Base64 (standard or URL-safe alphabet, optional padding), matched after removing whitespace (MIME
# line breaks): no part of the pattern can overlap another, so matching stays linear in the length.
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_WHITESPACE = re.compile(r"\s+")
_DATA_URI = re.compile(r"data:[^,;]{0,100}(;[^,]{0,100})?,", re.IGNORECASE)
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "EXPIRED"})


def _normalise(name: str) -> str:
    # reference_image, referenceImage and ReferenceImage are one field to us.
    return name.replace("_", "").replace("-", "").lower()


def looks_like_binary(value: str, max_bytes: int) -> bool:
    """True for a string longer than `max_bytes` that is base64 text or a data: URI."""
    if len(value) <= max_bytes:
        return False
    if _DATA_URI.match(value):
        return True
    # Prose has spaces and punctuation base64 lacks; a long run of the alphabet is an encoding.
    return " " not in value[:256] and _BASE64_TEXT.fullmatch(_WHITESPACE.sub("", value)) is not None


class BiometricFilter:
    """Removes biometric payloads from an upstream JSON object."""

    def __init__(
        self,
        field_names: Iterable[str],
        *,
        enabled: bool = True,
        allow_fields: Iterable[str] = (),
        max_string_bytes: int = 512,
        max_depth: int = 16,
    ) -> None:
        self._deny = frozenset(_normalise(name) for name in field_names)
        self._allow = frozenset(_normalise(name) for name in allow_fields) - self._deny
        self._enabled = enabled
        self._max_string_bytes = max_string_bytes
        self._max_depth = max_depth

    def apply(self, payload: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The payload without biometric payloads, and the names of the fields removed."""
        if not self._enabled:
            return payload, []
        removed: list[str] = []
        cleaned = self._strip(payload, removed, 0)
        if not isinstance(cleaned, dict):  # a dict always strips to a dict; refuse rather than assume
            raise TypeError("stripping a JSON object did not give an object")
        return cleaned, sorted(set(removed))

    def _strip(self, value: Any, removed: list[str], depth: int) -> Any:
        if depth > self._max_depth:
            return None  # deeper than any real result: drop rather than risk passing images through
        if isinstance(value, dict):
            kept: dict[str, Any] = {}
            for key, item in value.items():
                normalised = _normalise(key)
                if normalised in self._deny:
                    removed.append(key)
                elif normalised in self._allow:
                    # The allow list exempts this field's own value from the binary check; what is
                    # nested inside it still passes every rule (the deny list wins).
                    kept[key] = item if isinstance(item, str) else self._strip(item, removed, depth + 1)
                elif self._is_binary(item):
                    removed.append(key)
                else:
                    kept[key] = self._strip(item, removed, depth + 1)
            return kept
        if isinstance(value, list):
            return [self._strip(item, removed, depth + 1) for item in value if not self._is_binary(item)]
        return value

    def _is_binary(self, value: Any) -> bool:
        if isinstance(value, str):
            return looks_like_binary(value, self._max_string_bytes)
        if isinstance(value, list) and value:
            # A list of images (audit_images under another name): binary if every item is.
            return all(
                isinstance(item, str) and looks_like_binary(item, self._max_string_bytes) for item in value
            )
        return False


def is_confidence(value: object) -> TypeGuard[int | float]:
    """A usable confidence: a finite number on the 0-100 scale (not a boolean). The result the caller
    gets and the verdict the proxy stores apply this one rule, so they cannot disagree."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= 100
    )


def is_terminal(status: object) -> bool:
    """Whether an upstream `status` value (of any JSON type) is a finished session's status."""
    return isinstance(status, str) and status in TERMINAL_STATUSES


def derived_pass(payload: dict[str, Any], threshold: float) -> bool | None:
    """`passed` for a result: None while the session is not finished, else whether it succeeded
    with a confidence at or above the operator's threshold (Cynopsis itself gives no boolean)."""
    status = payload.get("status")
    if not is_terminal(status):
        return None
    confidence = payload.get("confidence")
    if status != "SUCCEEDED" or not is_confidence(confidence):
        return False
    return float(confidence) >= threshold

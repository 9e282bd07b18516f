"""Biometric minimisation: face images never leave the proxy unless the operator asks for them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _normalise(name: str) -> str:
    # reference_image, referenceImage and ReferenceImage are one field to us.
    return name.replace("_", "").replace("-", "").lower()


class BiometricFilter:
    """Removes the configured fields (any spelling, at any depth) from an upstream JSON object."""

    def __init__(self, field_names: Iterable[str], *, enabled: bool = True, max_depth: int = 16) -> None:
        self._fields = frozenset(_normalise(name) for name in field_names)
        self._enabled = enabled and bool(self._fields)
        self._max_depth = max_depth

    def apply(self, payload: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The payload without biometric fields, and the names that were removed."""
        if not self._enabled:
            return payload, []
        removed: list[str] = []
        cleaned = self._strip(payload, removed, 0)
        assert isinstance(cleaned, dict)
        return cleaned, sorted(set(removed))

    def _strip(self, value: Any, removed: list[str], depth: int) -> Any:
        if depth > self._max_depth:
            return None  # deeper than any real result: drop rather than risk passing images through
        if isinstance(value, dict):
            kept: dict[str, Any] = {}
            for key, item in value.items():
                if _normalise(key) in self._fields:
                    removed.append(key)
                else:
                    kept[key] = self._strip(item, removed, depth + 1)
            return kept
        if isinstance(value, list):
            return [self._strip(item, removed, depth + 1) for item in value]
        return value

"""Biometric minimisation on its own: fields removed in any spelling and depth, the switch, the depth cut."""

from __future__ import annotations

import json

from liveness_proxy.privacy import BiometricFilter


def test_biometric_fields_are_removed_in_any_spelling_and_depth() -> None:
    strip = BiometricFilter(["reference_image", "audit_images"])
    payload = {
        "session_id": "s",
        "ReferenceImage": {"Bytes": "AAAA"},
        "details": {"auditImages": [{"bytes": "BBBB"}], "score": 1},
        "history": [{"reference-image": "CCCC", "ok": True}],
    }
    cleaned, removed = strip.apply(payload)
    assert cleaned == {"session_id": "s", "details": {"score": 1}, "history": [{"ok": True}]}
    assert removed == ["ReferenceImage", "auditImages", "reference-image"]


def test_biometric_filter_can_be_turned_off() -> None:
    payload = {"reference_image": "AAAA"}
    assert BiometricFilter(["reference_image"], enabled=False).apply(payload) == (payload, [])


def test_pathologically_deep_results_are_cut_rather_than_passed_through() -> None:
    deep: dict[str, object] = {"reference_image": "AAAA"}
    for _ in range(40):
        deep = {"nested": deep}
    cleaned, _ = BiometricFilter(["reference_image"]).apply(deep)
    assert "AAAA" not in json.dumps(cleaned)

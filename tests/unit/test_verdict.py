"""Biometric minimisation of results and the derived `passed`, on their own (through the proxy and
into the database: integration/test_verdict.py)."""

from __future__ import annotations

import base64
import json
import time

from liveness_proxy.privacy import BiometricFilter, derived_pass, is_terminal, looks_like_binary
from liveness_proxy.store.verdicts import verdict_of

IMAGE_TEXT = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4).decode()


def test_base64_payloads_go_whatever_their_field_is_called() -> None:
    strip = BiometricFilter(["reference_image"], max_string_bytes=64)
    payload = {
        "status": "SUCCEEDED",
        "confidence": 97.5,
        "decision": "LIVE",
        "faceCrop": IMAGE_TEXT,
        "frames": [IMAGE_TEXT, IMAGE_TEXT],
        "extra": {"thumbnail": "data:image/jpeg;base64," + IMAGE_TEXT[:100]},
        "mixed": ["short", IMAGE_TEXT],
        "message": "The user blinked twice and then turned the head to the left as asked. " * 3,
    }
    cleaned, removed = strip.apply(payload)
    assert cleaned == {
        "status": "SUCCEEDED",
        "confidence": 97.5,
        "decision": "LIVE",
        "extra": {},
        "mixed": ["short"],
        "message": payload["message"],
    }
    assert removed == ["faceCrop", "frames", "thumbnail"]
    assert IMAGE_TEXT[:40] not in json.dumps(cleaned)


def test_allow_list_keeps_a_field_and_the_deny_list_wins_over_it() -> None:
    strip = BiometricFilter(
        ["reference_image"], allow_fields=["signature", "reference_image"], max_string_bytes=64
    )
    cleaned, removed = strip.apply({"signature": IMAGE_TEXT, "reference_image": "x", "blob": IMAGE_TEXT})
    assert cleaned == {"signature": IMAGE_TEXT}
    assert removed == ["blob", "reference_image"]


def test_short_or_prose_strings_are_not_binary() -> None:
    assert not looks_like_binary("A" * 64, 64)
    assert looks_like_binary("A" * 65, 64)
    assert not looks_like_binary("word " * 40, 64)
    assert looks_like_binary("data:image/png;base64,AAAA" + "A" * 100, 64)


def test_derived_pass_needs_a_finished_successful_session_above_the_threshold() -> None:
    assert derived_pass({"status": "SUCCEEDED", "confidence": 90.0}, 90) is True
    assert derived_pass({"status": "SUCCEEDED", "confidence": 89.99}, 90) is False
    assert derived_pass({"status": "FAILED", "confidence": 99.0}, 90) is False
    assert derived_pass({"status": "SUCCEEDED", "confidence": True}, 0.5) is False
    assert derived_pass({"status": "SUCCEEDED"}, 90) is False
    assert derived_pass({"status": "IN_PROGRESS", "confidence": 99.0}, 90) is None


def test_the_stored_verdict_and_the_answer_drop_the_same_confidences() -> None:
    """A confidence off the 0-100 scale is dropped from the caller's answer; the stored verdict (and
    so the admin route and the webhook) must not keep it either, nor pass on it."""
    for unusable in (150, -1, 100.0001, float("nan"), float("inf"), True, "97"):
        payload = {"status": "SUCCEEDED", "confidence": unusable}
        verdict = verdict_of(payload, recorded_at=1.0, request_id="r")
        assert verdict is not None
        assert verdict.confidence is None, unusable
        assert derived_pass(payload, 90) is False
    for usable in (0, 100, 97.5):
        verdict = verdict_of({"status": "FAILED", "confidence": usable}, recorded_at=1.0, request_id="r")
        assert verdict is not None
        assert verdict.confidence == usable


def test_an_allowed_field_still_loses_denied_fields_nested_in_it() -> None:
    strip = BiometricFilter(["reference_image"], allow_fields=["details"], max_string_bytes=64)
    cleaned, removed = strip.apply({"details": {"reference_image": IMAGE_TEXT, "blob": IMAGE_TEXT, "ok": 1}})
    assert cleaned == {"details": {"ok": 1}}
    assert removed == ["blob", "reference_image"]


def test_whitespace_runs_cannot_make_the_binary_check_slow() -> None:
    # A quadratic pattern would take minutes on this; a linear one takes milliseconds. The bound is
    # far above either, so the test checks the algorithm, not the machine.
    hostile = "\n" * 200_000 + "!"
    started = time.perf_counter()
    assert not looks_like_binary(hostile, 64)
    assert time.perf_counter() - started < 2.0


def test_odd_status_types_neither_crash_nor_count_as_terminal() -> None:
    statuses: list[object] = [[], {}, 5, None, True, "succeeded"]
    for status in statuses:
        assert not is_terminal(status)
        assert derived_pass({"status": status, "confidence": 99.0}, 90) is None
    assert is_terminal("EXPIRED")

"""A subject key set after subjects already have secrets: those secrets were wrapped with the key
derived from the pepper, which must keep opening them (until `subjects rewrap` moves them)."""

from __future__ import annotations

import os

import pytest

from liveness_proxy.store.subjects import PEPPER_KEY_ID, SubjectKeyError, SubjectKeys

PEPPER = "unit-pepper-" + "p" * 40


def test_secrets_wrapped_before_a_subject_key_existed_still_open_after_it_is_set() -> None:
    before = SubjectKeys.from_settings_values(pepper=PEPPER, subject_key="")
    secret = os.urandom(32)
    wrapped = before.wrap("lookup-1", secret)
    assert wrapped.startswith(PEPPER_KEY_ID + ".")
    after = SubjectKeys.from_settings_values(pepper=PEPPER, subject_key="s1:" + "k" * 40)
    assert after.current_key_id == "s1"
    assert after.unwrap("lookup-1", wrapped) == secret
    assert after.wrap("lookup-1", secret).startswith("s1.")
    # Still bound to its row: the same wrapped secret under another lookup does not open.
    with pytest.raises(SubjectKeyError):
        after.unwrap("lookup-2", wrapped)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("pepper:" + "k" * 40, "reserved"),
        ("x" * 33 + ":" + "k" * 40, "1-32"),
        ("s1:short", "at least 32"),
        ("s1:" + "k" * 40 + "\ns1:" + "j" * 40, "same key id"),
    ],
)
def test_bad_subject_keys_are_refused(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SubjectKeys.from_settings_values(pepper=PEPPER, subject_key=value)

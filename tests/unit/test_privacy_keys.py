"""The subject keys (`LIVENESS_PROXY_SUBJECT_KEY`, store/subjects.py) and the audit keys
(`LIVENESS_PROXY_AUDIT_KEYS_FILE`, store/audit_chain.py) as parsed from their settings: what is
accepted, what is refused and how the refusal reads (never with a secret, nor part of one)."""

from __future__ import annotations

import pytest

from liveness_proxy.store.audit_chain import AuditKeys, parse_audit_keys
from liveness_proxy.store.subjects import (
    MAX_KEY_ID_LENGTH,
    SubjectKeyError,
    SubjectKeys,
    parse_subject_keys,
)
from support import TEST_PEPPER

SECRET = "s" * 32

# -- subject keys -------------------------------------------------------------------------------------


def test_lines_of_key_ids_and_secrets_the_last_one_wraps() -> None:
    keys = parse_subject_keys(
        f"# rotated 2026-12\n\n  first:{'a' * 40}  \nsecond:{'b' * 32}\n", pepper=TEST_PEPPER
    )
    # The pepper-derived key first: it unwraps the secrets made before a subject key was set.
    assert [key.key_id for key in keys] == ["pepper", "first", "second"]
    assert keys[0] == parse_subject_keys("", pepper=TEST_PEPPER)[0]
    assert all(len(key.key) == 32 for key in keys)  # AES-256
    subject_keys = SubjectKeys.from_settings_values(
        pepper=TEST_PEPPER, subject_key=f"first:{'a' * 40}\nsecond:{'b' * 32}"
    )
    assert subject_keys.current_key_id == "second"
    lookup = subject_keys.lookup("alice")
    wrapped = subject_keys.wrap(lookup, b"x" * 32)
    assert wrapped.startswith("second.")
    assert subject_keys.unwrap(lookup, wrapped) == b"x" * 32


def test_a_bare_secret_gets_an_id_derived_from_it() -> None:
    (*_, key) = parse_subject_keys("q" * 40, pepper=TEST_PEPPER)
    (*_, again) = parse_subject_keys("q" * 40, pepper=TEST_PEPPER)
    (*_, other) = parse_subject_keys("r" * 40, pepper=TEST_PEPPER)
    assert key.key_id == again.key_id != other.key_id
    assert len(key.key_id) == 8
    assert "q" not in key.key_id


def test_without_a_subject_key_one_is_derived_from_the_pepper() -> None:
    keys = parse_subject_keys("", pepper=TEST_PEPPER)
    assert [key.key_id for key in keys] == ["pepper"]
    assert parse_subject_keys("# nothing yet\n", pepper=TEST_PEPPER) == keys
    assert parse_subject_keys("", pepper="another-" + TEST_PEPPER) != keys
    default = SubjectKeys.from_settings_values(pepper=TEST_PEPPER, subject_key="")
    lookup = default.lookup("alice")
    assert default.unwrap(lookup, default.wrap(lookup, b"k" * 32)) == b"k" * 32


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("k1:" + "a" * 31, "line 1: the secret needs at least 32 characters"),
        ("a" * 31, "line 1: the secret needs at least 32 characters"),
        (f"k1:{SECRET}\n\nk1:{'b' * 40}", "line 3: the same key id as line 1"),
        (f"bad id:{SECRET}", "line 1: a key id is 1-32 letters, digits, '-' or '_'"),
        (f"a.b:{SECRET}", "line 1: a key id is"),  # the dot separates the id in a wrapped secret
        (f"clé:{SECRET}", "line 1: a key id is"),
        (f":{SECRET}", "line 1: a key id is"),
        (f"{'k' * (MAX_KEY_ID_LENGTH + 1)}:{SECRET}", "line 1: a key id is"),
        (f"pepper:{SECRET}", "line 1: the key id 'pepper' is reserved"),
    ],
)
def test_refused_subject_keys(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_subject_keys(value, pepper=TEST_PEPPER)


def test_a_refusal_never_shows_a_secret_that_holds_a_colon() -> None:
    """A bare secret with a colon reads as `key_id:secret`: its first part must not be shown."""
    for value in ("hunter2-part-one:tail", f"hunter2-part-one:{SECRET}\nhunter2-part-one:{SECRET}"):
        with pytest.raises(ValueError, match="line") as refused:
            parse_subject_keys(value, pepper=TEST_PEPPER)
        assert "hunter2" not in str(refused.value)


def test_the_longest_key_id_fits_the_wrapped_column() -> None:
    key_id = "k" * MAX_KEY_ID_LENGTH
    keys = SubjectKeys.from_settings_values(pepper=TEST_PEPPER, subject_key=f"{key_id}:{SECRET}")
    assert len(keys.wrap(keys.lookup("alice"), b"x" * 32)) <= 128  # subject_secrets.wrapped


def test_unwrap_refuses_an_unknown_key_id_and_a_foreign_row() -> None:
    keys = SubjectKeys.from_settings_values(pepper=TEST_PEPPER, subject_key=f"k1:{SECRET}")
    alice, bob = keys.lookup("alice"), keys.lookup("bob")
    wrapped = keys.wrap(alice, b"x" * 32)
    with pytest.raises(SubjectKeyError, match="does not open with its key"):
        keys.unwrap(bob, wrapped)  # sealed to alice's row
    with pytest.raises(SubjectKeyError, match="wrapped with key 'k2', which is not configured"):
        keys.unwrap(alice, "k2." + wrapped.partition(".")[2])
    with pytest.raises(SubjectKeyError, match="does not open"):
        keys.unwrap(alice, "k1.not-base64!")


# -- audit keys ---------------------------------------------------------------------------------------


def test_the_pepper_key_always_verifies_and_the_last_line_signs() -> None:
    alone = parse_audit_keys("", pepper=TEST_PEPPER)
    assert (alone.key_ids, alone.signing_key_id) == (("pepper",), "pepper")
    keys = parse_audit_keys(f"# audit keys\n2026a:{'a' * 32}\n\n2026b:{'b' * 40}\n", pepper=TEST_PEPPER)
    assert keys.key_ids == ("pepper", "2026a", "2026b")
    assert keys.signing_key_id == "2026b"
    assert keys.get("pepper") == alone.get("pepper")
    assert parse_audit_keys("", pepper="another-" + TEST_PEPPER).get("pepper") != alone.get("pepper")


def test_a_record_signed_under_one_key_set_verifies_under_a_later_one() -> None:
    values = {"key_id": "pepper", "seq": 1, "prev_hash": "0" * 64, "action": "result.read"}
    values.update(dict.fromkeys(("credential_id", "detail", "personal_commitment", "problem"), None))
    values.update(request_id="r", session_id=None, status=200, subject_commitment=None, upstream_status=None)
    values.update(occurred_at=1.5, latency_ms=2.0)
    signed = parse_audit_keys("", pepper=TEST_PEPPER).sign(values)
    later = parse_audit_keys(f"2026a:{'a' * 32}", pepper=TEST_PEPPER)
    assert later.sign(values) == signed
    with pytest.raises(ValueError, match="audit key 'gone' is not configured"):
        later.sign({**values, "key_id": "gone"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no-separator-here", "line 1: expected key_id:secret"),
        (f":{SECRET}", "line 1: expected key_id:secret"),
        (f"ok:{SECRET}\nshort:{'s' * 31}", "line 2: the secret of key short needs at least 32 characters"),
        (f"pepper:{SECRET}", "line 1: the key id 'pepper' is reserved"),
        (f"bad id:{SECRET}", "line 1: a key id is 1-64 letters"),
        (f"{'k' * 65}:{SECRET}", "line 1: a key id is 1-64 letters"),
    ],
)
def test_refused_audit_key_files(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_audit_keys(text, pepper=TEST_PEPPER)


def test_an_audit_key_id_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        parse_audit_keys(f"k1:{SECRET}\nk1:{'t' * 32}", pepper=TEST_PEPPER)
    with pytest.raises(ValueError, match="at least one"):
        AuditKeys([])

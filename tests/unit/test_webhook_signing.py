"""Our Standard Webhooks signatures, judged by the official `standardwebhooks` package; the retry and
follow-up schedules; Retry-After."""

from __future__ import annotations

import base64
import datetime as dt
import time

import pytest
import standardwebhooks
from hypothesis import given
from hypothesis import strategies as st

from liveness_proxy.background import FinalizerSchedule, RetrySchedule
from liveness_proxy.http.retry_after import parse_retry_after
from liveness_proxy.observability import Redactor
from liveness_proxy.webhook_signing import parse_webhook_secrets, webhook_headers

# Fixed, so that parametrized test ids are the same in every xdist worker.
SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
OTHER = "whsec_" + base64.b64encode(bytes(range(32, 64))).decode()


@given(text=st.text(max_size=512), message_id=st.from_regex(r"msg_[a-z0-9]{1,40}", fullmatch=True))
def test_the_official_library_signs_exactly_what_we_sign(text: str, message_id: str) -> None:
    timestamp = int(time.time())
    headers = webhook_headers(parse_webhook_secrets(SECRET), message_id, timestamp, text.encode())
    expected = standardwebhooks.Webhook(SECRET).sign(
        message_id, dt.datetime.fromtimestamp(timestamp, tz=dt.UTC), text
    )
    assert headers["webhook-signature"] == expected


def test_a_rotation_sends_one_signature_per_secret_and_either_secret_verifies() -> None:
    body = b'{"type":"liveness.session.completed","data":{}}'
    headers = webhook_headers(parse_webhook_secrets(f"{SECRET} {OTHER}"), "msg_1", int(time.time()), body)
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (SECRET, OTHER):
        assert standardwebhooks.Webhook(secret).verify(body, headers) == {
            "type": "liveness.session.completed",
            "data": {},
        }


def test_a_signature_made_with_another_secret_or_for_other_bytes_is_refused() -> None:
    body = b'{"a":1}'
    headers = webhook_headers(parse_webhook_secrets(OTHER), "msg_1", int(time.time()), body)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(body, headers)
    good = webhook_headers(parse_webhook_secrets(SECRET), "msg_1", int(time.time()), body)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(b'{"a":2}', good)


def test_a_stored_signature_goes_stale_so_each_attempt_signs_afresh() -> None:
    body = b"{}"
    stale = webhook_headers(parse_webhook_secrets(SECRET), "msg_1", int(time.time()) - 600, body)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(body, stale)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "no secret"),
        ("plain-password-1", "must start with 'whsec_'"),
        ("whsec_not base64!", "secret 1 is not valid base64"),  # "whsec_not", then "base64!"
        ("whsec_%%%%", "not valid base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "must decode to 24-64 bytes"),
        (f"{SECRET} nope", "secret 2 must start with"),
    ],
)
def test_malformed_secrets_are_refused_without_quoting_them(value: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as refused:
        parse_webhook_secrets(value)
    if value:
        assert value not in str(refused.value)


def test_the_log_redactor_knows_webhook_secrets() -> None:
    assert SECRET not in Redactor().scrub(f"configured {SECRET} here")


def test_retry_schedule_counts_attempts_jitters_and_honours_retry_after() -> None:
    schedule = RetrySchedule((0, 5, 300))
    assert schedule.after_attempt(1, retry_after=None, draw=lambda: 0.5) == 5
    assert schedule.after_attempt(1, retry_after=None, draw=lambda: 0.0) == pytest.approx(4.0)
    assert schedule.after_attempt(2, retry_after=None, draw=lambda: 1.0) == pytest.approx(360.0)
    assert schedule.after_attempt(1, retry_after=60, draw=lambda: 0.5) == 60
    assert schedule.after_attempt(3, retry_after=None, draw=lambda: 0.5) is None  # dead letter


def test_finalizer_schedule_reads_at_each_offset_then_the_deadline_then_stops() -> None:
    schedule = FinalizerSchedule(offsets=(3, 6, 12), deadline_seconds=20)
    created = 1000.0
    assert schedule.next_read(created, 1000.0) == 1003.0
    assert schedule.next_read(created, 1003.0) == 1006.0
    assert schedule.next_read(created, 1012.5) == 1020.0  # past the offsets: once at the deadline
    assert schedule.next_read(created, 1020.0) is None
    short = FinalizerSchedule(offsets=(3, 6, 12), deadline_seconds=5)
    assert short.first_offset == 3
    assert short.next_read(created, 1003.0) == 1005.0


def test_retry_after_that_is_not_ascii_or_overflows_is_read_as_a_default_never_raised() -> None:
    # Header values are decoded as latin-1: "²" passes str.isdigit(); a huge year overflows datetime.
    assert parse_retry_after("\u00b2") == 1
    assert parse_retry_after("Mon, 01 Jan 99999999999999999999 00:00:00 GMT") == 1
    assert parse_retry_after("120") == 120
    assert parse_retry_after("99999999") == 3600

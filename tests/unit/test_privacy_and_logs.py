"""Biometric minimisation and log redaction, on their own."""

from __future__ import annotations

import io
import json

from liveness_proxy.observability import REDACTED, AccessLog, Redactor, build_logger
from liveness_proxy.privacy import BiometricFilter
from liveness_proxy.upstream.transport import parse_retry_after


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


def test_redactor_scrubs_known_secrets_and_credential_shapes() -> None:
    redactor = Redactor(["client-secret-value"])
    redactor.add_secret("access-token-value-123")
    text = (
        "secret=client-secret-value token=access-token-value-123 "
        "key=lpk_0123456789abcdef_abcdefghijklmnopqrstuvwxyz012345 "
        "header=Bearer eyJhbGciOiJSUzI1NiJ9.x.y form=client_secret=abc&x=1"
    )
    scrubbed = redactor.scrub(text)
    for leaked in (
        "client-secret-value",
        "access-token-value-123",
        "lpk_0123",
        "eyJhbGci",
        "client_secret=abc",
    ):
        assert leaked not in scrubbed
    assert scrubbed.count(REDACTED) == 5


def test_every_log_line_passes_the_redactor_nested_values_too() -> None:
    stream = io.StringIO()
    redactor = Redactor(["pepper-pepper-pepper"])
    logger = build_logger(level="info", log_format="json", redactor=redactor, stream=stream)
    logger.info("event", detail={"inner": ["pepper-pepper-pepper"]}, note="Bearer abc.def")
    logger.debug("hidden at info level")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["detail"] == {"inner": [REDACTED]}
    assert record["note"] == REDACTED


def test_retry_after_is_bounded_and_tolerant() -> None:
    assert parse_retry_after("7") == 7
    assert parse_retry_after("0") == 1
    assert parse_retry_after("999999") == 3600
    assert parse_retry_after("soon") == 1
    assert parse_retry_after(None, default=3) == 3
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10


def test_retry_after_refuses_non_ascii_digits_and_absurd_lengths() -> None:
    assert parse_retry_after("²") == 1
    assert parse_retry_after("9" * 5000) == 1


def test_token_answers_with_odd_expires_in_are_token_endpoint_errors() -> None:
    import pytest

    from liveness_proxy.upstream import ClientCredentialsFetcher, TokenEndpointError

    fetcher = ClientCredentialsFetcher(
        None,  # type: ignore[arg-type]  # parsing needs no session
        token_url="http://unused",
        client_id="c",
        client_secret=lambda: "s",
        default_lifetime_seconds=300,
        max_lifetime_seconds=86400,
        timeout_seconds=1,
    )
    assert fetcher._parse(b'{"access_token": "abc", "expires_in": "600"}').lifetime_seconds == 600
    for expires_in in ('"\\u00b2"', '"' + "9" * 5000 + '"', "-5", "0", "true", '"1e3"', "[]"):
        with pytest.raises(TokenEndpointError):
            fetcher._parse(b'{"access_token": "abc", "expires_in": ' + expires_in.encode() + b"}")
    for token in ('"a b"', '"a\\nb"', '""', "5", '"' + "a" * 9000 + '"'):
        with pytest.raises(TokenEndpointError):
            fetcher._parse(b'{"access_token": ' + token.encode() + b"}")
    with pytest.raises(TokenEndpointError):
        fetcher._parse(b'{"access_token": "abc", "token_type": "mac"}')


def test_the_direct_access_log_line_matches_the_structlog_pipeline_and_is_redacted() -> None:
    secret = "pepper-" + "s" * 40
    fields = {
        "request_id": "r-1",
        "method": "GET",
        "route": "/v1/liveness/sessions/{session_id}/result",
        "status": 200,
        "duration_ms": 1.5,
        "subject": f"user-{secret}",
        "upstream_status": None,
    }
    through_structlog, direct = io.StringIO(), io.StringIO()
    redactor = Redactor([secret])
    logger = build_logger(level="info", log_format="json", redactor=redactor, stream=through_structlog)
    logger.info("request", **fields)
    AccessLog(level="info", log_format="json", redactor=redactor, fallback=logger, stream=direct).request(
        dict(fields)
    )
    expected, written = json.loads(through_structlog.getvalue()), json.loads(direct.getvalue())
    assert list(written) == list(expected)  # same keys, same order
    assert {**written, "timestamp": None} == {**expected, "timestamp": None}
    assert written["timestamp"].endswith("Z")
    assert written["subject"] == f"user-{REDACTED}"
    assert secret not in direct.getvalue()
    quiet = io.StringIO()
    AccessLog(level="warning", log_format="json", redactor=redactor, fallback=logger, stream=quiet).request(
        dict(fields)
    )
    assert quiet.getvalue() == ""

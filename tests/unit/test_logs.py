"""Log redaction on its own: known secrets and credential shapes, nested values, the access-log line."""

from __future__ import annotations

import io
import json

from liveness_proxy.observability import REDACTED, AccessLog, Redactor, build_logger
from liveness_proxy.settings import settings_from_mapping
from liveness_proxy.wiring import app_options


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


def test_a_log_line_loses_url_passwords_in_every_form() -> None:
    stream = io.StringIO()
    logger = build_logger(level="info", log_format="json", redactor=Redactor(), stream=stream)
    logger.warning(
        "shared_state_unavailable",
        reason="cannot reach rediss://u:tls-pw@cache:6379/0?password=redis-query-pw, nor redis://:redis-pw@c/0",
        detail={"dsn": ["host=db password=libpq-word-pw sslmode=require"]},
        url="postgresql+asyncpg://u@h/db?password=pg-query-pw&sslmode=require",
        database="postgresql://app:pg-userinfo-pw@db/live",
    )
    line = stream.getvalue()
    for secret in ("tls-pw", "redis-query-pw", "redis-pw", "libpq-word-pw", "pg-query-pw", "pg-userinfo-pw"):
        assert secret not in line
    record = json.loads(line)
    assert record["url"] == f"postgresql+asyncpg://u@h/db?password={REDACTED}&sslmode=require"
    assert record["database"] == f"postgresql://app:{REDACTED}@db/live"


def test_the_proxy_knows_its_url_passwords_even_when_quoted_alone() -> None:
    """A driver's error may quote the password without its URL: the redactor is taught the values."""
    settings = settings_from_mapping(
        {
            "LIVENESS_PROXY_DATABASE_URL": "postgresql://app@db/live?password=pg-query-only-pw",
            "LIVENESS_PROXY_REDIS_URL": "rediss://u:redis-userinfo-pw@cache/0?password=redis-query-pw",
        }
    )
    redactor = Redactor(app_options(settings).secrets)
    said = "auth failed with pg-query-only-pw, redis-userinfo-pw and redis-query-pw"
    assert redactor.scrub(said) == f"auth failed with {REDACTED}, {REDACTED} and {REDACTED}"


def test_iso_timestamps_are_datetimes_isoformat() -> None:
    import datetime as dt
    import random

    from liveness_proxy.observability import IsoTimestamps

    stamps = IsoTimestamps()
    chooser = random.Random(21)
    moments = [1_796_000_000.0, 1_796_000_000.5, 1_796_000_000.9999996, 1_796_000_001.0000004]
    moments += [1_796_000_000 + chooser.uniform(0, 5) for _ in range(5_000)]
    moments += [1_796_000_000 + chooser.randrange(0, 10**6) / 10**6 for _ in range(2_000)]  # exact micros
    for now in sorted(moments) + moments:  # in order (the cache hits) and out of order
        expected = dt.datetime.fromtimestamp(now, dt.UTC).isoformat().replace("+00:00", "Z")
        assert stamps.at(now) == expected, now


def test_a_callers_request_id_is_searched_for_secrets_and_the_proxys_own_is_not() -> None:
    secret = "pepper-" + "s" * 40
    redactor = Redactor([secret])
    logger = build_logger(level="info", log_format="json", redactor=redactor, stream=io.StringIO())
    for own, expected in ((False, REDACTED), (True, secret)):
        stream = io.StringIO()
        AccessLog(level="info", log_format="json", redactor=redactor, fallback=logger, stream=stream).request(
            {"request_id": secret, "method": "GET"}, own_request_id=own
        )
        assert json.loads(stream.getvalue())["request_id"] == expected

"""Passwords in URLs, in every form: userinfo, `?password=`, any parameter named like a secret; in one
URL (what `check` prints) and in free text (what the log redactor sees)."""

from __future__ import annotations

import time

import pytest

from liveness_proxy.url_secrets import redact_url, scrub_url_secrets, url_secret_values

SHOWN = [
    # PostgreSQL: userinfo, the query form SQLAlchemy and libpq take, libpq's other secrets.
    ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
    ("postgresql+asyncpg://u:pw@h:5432/db", "postgresql+asyncpg://u:***@h:5432/db"),
    (
        "postgresql+asyncpg://u@h/db?password=secret&sslmode=require",
        "postgresql+asyncpg://u@h/db?password=***&sslmode=require",
    ),
    (
        "postgresql://u@h/db?sslmode=verify-full&sslpassword=keypass&application_name=lp",
        "postgresql://u@h/db?sslmode=verify-full&sslpassword=***&application_name=lp",
    ),
    ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),  # an unencoded "@": hidden whole
    ("postgresql://u:p%40ss@h/db?PASSWORD=x", "postgresql://u:***@h/db?PASSWORD=***"),
    # Redis: userinfo with or without a user, the query form, TLS.
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("rediss://u:pw@h/0?password=x", "rediss://u:***@h/0?password=***"),
    ("redis://h:6379/0?password=x&db=1", "redis://h:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?password=x&db=0", "unix:///run/redis.sock?password=***&db=0"),
    # Any parameter named like a secret, in any case or spelling.
    (
        "https://hooks.example/in?api_key=a&Token=b&client_secret=c&X-Amz-Signature=d&pwd=e&auth=f&id=7",
        "https://hooks.example/in?api_key=***&Token=***&client_secret=***&X-Amz-Signature=***&pwd=***&auth=***&id=7",
    ),
    ("https://h/x?pass%77ord=x&q=1#part", "https://h/x?pass%77ord=***&q=1#part"),
    # Nothing to hide: unchanged.
    ("sqlite:///./liveness-proxy.db", "sqlite:///./liveness-proxy.db"),
    ("postgresql://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
    ("redis://h/0?password=", "redis://h/0?password="),
    ("https://crm-demo.cynopsis.co/oauth/token", "https://crm-demo.cynopsis.co/oauth/token"),
]


@pytest.mark.parametrize(("url", "shown"), SHOWN)
def test_a_url_is_shown_without_its_secrets(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_free_text_loses_every_url_password_and_secret_parameter() -> None:
    text = (
        'connection to "postgresql://app:userinfo-pw@db:5432/live?password=query-pw" failed; '
        "retrying redis://:redis-pw@cache:6379/0 and rediss://u:tls-pw@cache/0?password=rq-pw, "
        "libpq said: host=db password=word-pw sslmode=require "
        "<https://hooks.example/in?token=hook-token&id=7>"
    )
    scrubbed = scrub_url_secrets(text, "[REDACTED]")
    for secret in ("userinfo-pw", "query-pw", "redis-pw", "tls-pw", "rq-pw", "word-pw", "hook-token"):
        assert secret not in scrubbed
    # What is not secret stays readable, to tell which server was meant.
    for kept in ("postgresql://app:", "@db:5432/live", "redis://:", "sslmode=require", "id=7", "host=db"):
        assert kept in scrubbed


def test_the_secret_values_are_known_as_written_and_decoded() -> None:
    values = url_secret_values("postgresql://u:p%40ss@h/db?password=a%2Bb&sslmode=require&token=t")
    assert set(values) == {"p%40ss", "p@ss", "a%2Bb", "a+b", "t"}
    assert url_secret_values("redis://h/0") == []
    assert url_secret_values("postgresql://u:pw@[::1/db") == []  # urllib refuses it: no crash


def test_scrubbing_stays_linear_on_hostile_text() -> None:
    """The redactor runs on every log line: long runs that nearly match must not backtrack."""
    # Each takes a naive pattern (no possessive runs, every start tried) minutes; these, milliseconds.
    hostile = [
        "a" * 100_000 + " x://y:z@",  # a long word that could start a scheme, and never does
        "x://" + "b" * 100_000 + " @",  # a long would-be user part with no ":" after it
        "key" * 40_000 + " =x",  # a long would-be parameter name with no "=" after it
        " ".join(["k=v"] * 50_000) + " x://y:z@",
    ]
    started = time.perf_counter()
    for text in hostile:
        scrub_url_secrets(text, "[REDACTED]")
    assert time.perf_counter() - started < 2.0


def test_a_userinfo_password_is_known_as_the_driver_decodes_it() -> None:
    # `unquote`, not `unquote_plus`: a "+" in userinfo stays a "+" for asyncpg and redis-py.
    assert "s3+cr+t" in url_secret_values("postgresql://u:s3+cr%2Bt@h/db")


@pytest.mark.parametrize(
    "text",
    ["host=db password='s3 cr3t' user=x", "host=db password='s3 cr3t", r"password='it\'s secret' port=5432"],
)
def test_a_quoted_libpq_password_is_masked_whole(text: str) -> None:
    scrubbed = scrub_url_secrets(text, "[R]")
    assert "s3" not in scrubbed
    assert "secret" not in scrubbed
    assert "password=[R]" in scrubbed

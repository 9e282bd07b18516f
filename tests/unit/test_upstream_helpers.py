"""The upstream helpers on their own: Retry-After bounds and parsing, odd `expires_in` in token answers."""

from __future__ import annotations

from liveness_proxy.http.retry_after import parse_retry_after


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

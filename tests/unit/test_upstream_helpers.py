"""The upstream helpers on their own: Retry-After bounds and parsing, odd `expires_in` in token answers."""

from __future__ import annotations

import pytest

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


def test_the_echo_check_knows_every_character_json_escapes() -> None:
    """A secret is looked for as it is unless JSON text escapes one of its characters: the shortcut
    must know exactly the characters orjson escapes."""
    import orjson

    from liveness_proxy.upstream.echoes import _JSON_ESCAPED

    for code in (*range(0xD800), *range(0xE000, 0x110000)):
        char = chr(code)
        escaped = orjson.dumps(char)[1:-1] != char.encode()
        assert escaped == (_JSON_ESCAPED.search(char) is not None), hex(code)


@pytest.mark.parametrize(
    "secret", ['quote"in-the-middle-of-it', "back\\slash-secret-value", "tab\tinside-a-secret-value"]
)
def test_a_secret_json_escapes_is_found_in_either_form(secret: str) -> None:
    import orjson

    from liveness_proxy.errors import UpstreamMalformed
    from liveness_proxy.upstream.echoes import refuse_echoed_secrets

    written = orjson.dumps({"echo": secret})
    for raw, decoded in ((written, b"{}"), (b"{}", written), (secret.encode(), b"{}")):
        with pytest.raises(UpstreamMalformed):
            refuse_echoed_secrets(raw, decoded, [secret], status=200)
    refuse_echoed_secrets(b'{"status":"IN_PROGRESS"}', b'{"status":"IN_PROGRESS"}', [secret], status=200)

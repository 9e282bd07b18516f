"""Passwords in URLs, found and masked: what `check` and `db upgrade` print, what the log redactor
scrubs from any text, and what a configuration error may quote.

A database or Redis URL carries its password in one of two forms: the userinfo
(`postgresql://user:PASSWORD@host/db`, `redis://:PASSWORD@host:6379/0`) or a query parameter
(`redis://host/0?password=PASSWORD`, `postgresql://user@host/db?password=PASSWORD`; libpq's
`sslpassword`, a receiver's `?token=`). A parameter is a secret when its name contains one of
`SECRET_NAME_PARTS`, in any case: password, passwd, sslpassword, passphrase (`pass`), pwd, secret,
client_secret, token, access_token, key, api_key, sslkey, auth, credential(s) and signature. That
also hides a few that are only file names (`sslkey=/etc/key.pem`): shown as set, not what they are.

Stdlib only, at the bottom of the layers: `settings` (for `check`) and `observability` (for logs) use
it, and neither may import the other.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus, urlsplit

# A query parameter whose name contains one of these (any case) holds a secret.
SECRET_NAME_PARTS = ("pass", "pwd", "secret", "token", "key", "auth", "credential", "signature")
DISPLAY_MASK = "***"

# Where a URL in free text ends: whitespace, or the quotes and brackets text puts around one.
_NOT_IN_URL = r"\s'\"<>"
# scheme://user:PASSWORD@ — the password runs to the last "@" before the URL ends (a password with
# an unencoded "@" is still hidden whole; an "@" later in the same URL hides more, never less). It
# starts only where a run of scheme characters starts, and the possessive runs never backtrack: the
# log redactor runs this on every line, so it stays linear in the text's length.
_USERINFO_PASSWORD = re.compile(
    rf"(?<![A-Za-z0-9+.-])(?P<keep>[A-Za-z][A-Za-z0-9+.-]*+://[^{_NOT_IN_URL}:/?#@]*+:)"
    rf"(?P<secret>[^{_NOT_IN_URL}]*)@"
)
# name=VALUE after "?", "&" or ";" in a URL, or as a word of free text (libpq's `password=...`).
# Every pair matches; its name decides whether the value is masked (`scrub_url_secrets`).
# A libpq value may be single-quoted (`password='s3 cr3t'`, with \' and \\ escapes): the quotes
# are then the value's bounds.
_PARAMETER = re.compile(
    rf"(?<![^?&;\s])(?P<keep>(?P<name>[^={_NOT_IN_URL}&;?#]++)=)"
    rf"(?P<value>'(?:[^'\\]|\\.)*+'?|[^{_NOT_IN_URL}&;#]++)"
)


def is_secret_parameter(name: str) -> bool:
    """Whether a parameter of this name (as written, or percent-encoded) holds a secret."""
    lowered = unquote_plus(name).lower()
    return any(part in lowered for part in SECRET_NAME_PARTS)


def scrub_url_secrets(text: str, mask: str) -> str:
    """`text` with every URL password and secret-named parameter value replaced by `mask`."""
    if "://" in text and "@" in text:
        text = _USERINFO_PASSWORD.sub(lambda match: match["keep"] + mask + "@", text)
    if "=" in text:

        def masked_parameter(match: re.Match[str]) -> str:
            return match["keep"] + mask if is_secret_parameter(match["name"]) else match[0]

        text = _PARAMETER.sub(masked_parameter, text)
    return text


def redact_url(url: str) -> str:
    """A URL for display: its password and any secret-named parameter's value shown as `***`."""
    return scrub_url_secrets(url, DISPLAY_MASK)


def url_secret_values(url: str) -> list[str]:
    """The secrets a URL holds (its password, its secret-named parameters' values), as written and
    decoded: a redactor taught them finds them even where a driver's message quotes one alone."""
    try:
        password = urlsplit(url).password
    except ValueError:  # not a URL urllib can take apart: the shapes above still apply to it
        password = None
    values = [password] if password else []
    query = url.partition("?")[2].partition("#")[0]
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if value and is_secret_parameter(name):
            values.append(value)
    # Drivers decode userinfo with `unquote` and queries with either: every reading is known.
    return sorted(
        {*values, *(unquote(value) for value in values), *(unquote_plus(value) for value in values)}
    )

"""Structured logs (structlog, JSON lines) with one redaction step that every line passes through.

Nothing secret should reach a log call in the first place; the redactor is the second line of
defence: it replaces any known secret value (client secret, pepper, the access tokens we obtained,
the database's and Redis's passwords), anything shaped like an API key or a bearer credential, and
any password in a URL or secret-named parameter in text (`url_secrets`: `postgresql://u:PW@h`,
`?password=PW`, `?token=…`, a libpq `password=PW` word).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from liveness_proxy.url_secrets import scrub_url_secrets

REDACTED = "[REDACTED]"
_CREDENTIAL_PATTERNS = re.compile(
    r"lpk_[0-9a-f]{16}_[A-Za-z0-9_-]+"  # our API keys
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]+"  # any bearer credential
    r"|(?i:client_secret)=[^&\s]+"  # a form-encoded client secret
    r"|whsec_[A-Za-z0-9+/=]+"  # a webhook signing secret
)
_MAX_KNOWN_SECRETS = 16
# Secrets shorter than this are not matched (they would redact ordinary words); no credential shape
# above is shorter either ("bearer x" is the shortest), so shorter strings are left alone.
_MIN_SECRET_LENGTH = 8


class Redactor:
    """A structlog processor that scrubs secrets from every value of an event, nested ones too.

    Every log line passes through here (one access-log line per request), so the known secrets and
    the credential shapes are one compiled alternation, rebuilt only when a secret is added, and a
    string too short to hold any of them is not searched at all."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._static = tuple(secret for secret in secrets if len(secret) >= _MIN_SECRET_LENGTH)
        # Access tokens rotate: remember the last few so an old one in a late log line is caught.
        self._dynamic: deque[str] = deque(maxlen=_MAX_KNOWN_SECRETS)
        self._known = self._compile()

    def add_secret(self, secret: str, *, permanent: bool = False) -> None:
        """Teaches a secret. `permanent` ones (a rotated client secret: rare) are never forgotten;
        the others (access tokens: one per refresh) are kept among the last few."""
        if len(secret) < _MIN_SECRET_LENGTH or secret in self._static:
            return
        if permanent:
            self._static = (*self._static, secret)
        elif secret in self._dynamic:
            return
        else:
            self._dynamic.append(secret)
        self._known = self._compile()

    def _compile(self) -> re.Pattern[str] | None:
        # Longest first, so a secret that contains another is replaced whole.
        known = sorted({*self._static, *self._dynamic}, key=len, reverse=True)
        return re.compile("|".join(re.escape(secret) for secret in known)) if known else None

    def scrub(self, text: str) -> str:
        if len(text) < _MIN_SECRET_LENGTH:
            return text
        # Known secrets first, then the shapes: a credential pattern must not swallow the start of
        # a known secret (stopping at a character it does not allow) and leave the rest readable.
        if self._known is not None:
            text = self._known.sub(REDACTED, text)
        return scrub_url_secrets(_CREDENTIAL_PATTERNS.sub(REDACTED, text), REDACTED)

    def _scrub_value(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if depth > 8:
            return value
        if isinstance(value, dict):
            return {key: self._scrub_value(item, depth + 1) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub_value(item, depth + 1) for item in value]
        return value

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        for key, value in event_dict.items():
            event_dict[key] = self._scrub_value(value)
        return event_dict


def _orjson_text(obj: Any, **_kwargs: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def build_logger(
    *, level: str, log_format: str, redactor: Redactor, stream: TextIO | None = None
) -> structlog.typing.FilteringBoundLogger:
    """A logger of this app's own (no global structlog configuration, so two apps can differ)."""
    renderer: structlog.typing.Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_text)
    processors: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redactor,
        renderer,
    ]
    logger: structlog.typing.FilteringBoundLogger = structlog.wrap_logger(
        structlog.WriteLogger(stream or sys.stderr),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        cache_logger_on_first_use=True,
    )
    return logger


# Access-log values the proxy made itself, never from the caller or the upstream: a route template,
# a trace id and a commitment (hex). Not searched for secrets: a few us per line (profiled, S1).
_OWN_ACCESS_LOG_VALUES = frozenset({"route", "trace_id", "subject_commitment"})
# ... and the request id too, when the proxy drew it rather than taking the caller's X-Request-ID.
_OWN_ACCESS_LOG_VALUES_AND_ID = _OWN_ACCESS_LOG_VALUES | {"request_id"}


class IsoTimestamps:
    """`datetime.now(UTC).isoformat()` with `Z` for `+00:00` (structlog's `TimeStamper(fmt="iso",
    utc=True)`), with the date and time of day formatted once per second instead of per line:
    building a datetime and formatting it was about a fifth of an access-log line (profiled)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def at(self, now: float) -> str:
        second = int(now)
        # As datetime.fromtimestamp rounds: half to even, to the microsecond.
        micro = round((now - second) * 1_000_000)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        if second != self._second:
            self._prefix = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        # isoformat() leaves the fraction out when it is zero.
        return f"{self._prefix}.{micro:06d}Z" if micro else f"{self._prefix}Z"


class AccessLog:
    """The one access-log line per request, in exactly the JSON the structlog pipeline writes
    (same keys in the same order, same timestamp format, same redaction), without the pipeline.

    It is the only log call every request makes; structlog's processor chain cost ~25 us of it
    (profiled), this path a few. Other events, and the console format, still go through structlog.
    """

    def __init__(
        self,
        *,
        level: str,
        log_format: str,
        redactor: Redactor,
        fallback: structlog.typing.FilteringBoundLogger,
        stream: TextIO | None = None,
    ) -> None:
        self._enabled = logging.getLevelNamesMapping()[level.upper()] <= logging.INFO
        self._fallback = fallback if log_format != "json" else None
        # A WriteLogger of its own on the same stream: structlog keeps one lock per file, so lines
        # from both never interleave.
        self._sink = structlog.WriteLogger(stream or sys.stderr)
        self._redactor = redactor
        self._timestamps = IsoTimestamps()

    def request(self, fields: dict[str, Any], *, own_request_id: bool = False) -> None:
        """Writes one "request" event; `fields` holds strings, numbers and None only.
        `own_request_id`: the proxy drew the request id itself (not a caller's to search)."""
        if not self._enabled:
            return
        if self._fallback is not None:
            self._fallback.info("request", **fields)
            return
        scrub = self._redactor.scrub
        own = _OWN_ACCESS_LOG_VALUES_AND_ID if own_request_id else _OWN_ACCESS_LOG_VALUES
        for key, value in fields.items():
            if type(value) is str and key not in own:
                fields[key] = scrub(value)
        fields["event"] = "request"
        fields["level"] = "info"
        fields["timestamp"] = self._timestamps.at(time.time())
        self._sink.msg(orjson.dumps(fields, default=str).decode())

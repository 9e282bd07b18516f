"""What goes in and out is exactly what we declare.

Request bodies: each POST route's body is validated against its model in `schemas` (the same
model the OpenAPI document is generated from, so the document and the check cannot disagree). An
unknown member is refused with a 422 naming it, unless the operator lists it in
LIVENESS_PROXY_EXTRA_BODY_FIELDS; only validated members are forwarded.

Answers: each upstream answer is reduced to the members of the assumed contract, each with its
type and bounds, plus the members the operator allows (LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS).
Everything else is dropped whole, whatever it holds (an image in any encoding included), and named
in `redacted_fields`. The allowed extra members then pass the image heuristics of `privacy.py` as a
second line; relaxing those (LIVENESS_PROXY_BIOMETRIC_ALLOW_FIELDS,
LIVENESS_PROXY_STRIP_BIOMETRICS=false) never widens the allow list.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from liveness_proxy.api.paths import is_session_id
from liveness_proxy.errors import UnprocessableContent
from liveness_proxy.privacy import BiometricFilter, is_confidence

# A dropped member is named only if its name is a short identifier, and at most this many are
# named: a name is chosen by the upstream, and a list of long or many names could itself carry data.
MAX_NAMED_FIELDS = 8
UNNAMED_FIELDS = "..."
_NAMEABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
_STATUS = re.compile(r"[A-Za-z_]{1,32}")
_MAX_SESSION_TOKEN_CHARS = 4096
_MAX_LIFETIME_SECONDS = 10_000_000
# How the base64 (standard or URL-safe) of a PNG, JPEG, GIF or WebP/RIFF file begins.
_IMAGE_BASE64_OPENINGS = ("iVBORw0KGgo", "/9j/", "_9j_", "R0lGOD", "UklGR")
# Field names quoted in a 422: at most this many, each cut to this length.
_MAX_QUOTED_FIELDS = 5
_MAX_QUOTED_CHARS = 64

Check = Callable[[object], bool]


def is_session_token(value: object) -> bool:
    """1-4096 visible ASCII characters (what any bearer token is made of) that do not open like an
    encoded image: the token is passed on verbatim, so the image check is its own."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_SESSION_TOKEN_CHARS
        and value.isascii()
        and all("!" <= char <= "~" for char in value)
        and not value[:5].lower().startswith("data:")
        and not value.startswith(_IMAGE_BASE64_OPENINGS)
    )


def is_lifetime(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_LIFETIME_SECONDS


def is_status(value: object) -> bool:
    return isinstance(value, str) and _STATUS.fullmatch(value) is not None


def _is_session_id(value: object) -> bool:
    return isinstance(value, str) and is_session_id(value)


SESSION_TOKEN_ANSWER: Mapping[str, Check] = {"session_token": is_session_token, "expires_in": is_lifetime}


def session_answer(session_id_fields: Iterable[str]) -> dict[str, Check]:
    """The create-session answer: the session id (under each name the operator configured for
    it), its status and lifetime."""
    return {
        **dict.fromkeys(session_id_fields, _is_session_id),
        "status": is_status,
        "expires_in": is_lifetime,
    }


def result_answer(session_id_fields: Iterable[str]) -> dict[str, Check]:
    return {
        **dict.fromkeys(session_id_fields, _is_session_id),
        "status": is_status,
        "confidence": is_confidence,
    }


class DeclaredAnswer:
    """One upstream answer's allow list."""

    def __init__(
        self, declared: Mapping[str, Check], *, extra_fields: Iterable[str], biometrics: BiometricFilter
    ) -> None:
        self._declared = dict(declared)
        self._extra = frozenset(extra_fields) - self._declared.keys()
        self._biometrics = biometrics

    def reduce(self, payload: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The answer reduced to its declared shape, and the names of what was dropped (see
        `named`)."""
        kept: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        dropped: list[str] = []
        for name, value in payload.items():
            check = self._declared.get(name)
            if check is not None:
                if check(value):
                    kept[name] = value
                else:
                    dropped.append(name)
            elif name in self._extra:
                extra[name] = value
            else:
                dropped.append(name)
        if extra:
            cleaned, removed = self._biometrics.apply(extra)
            kept.update(cleaned)
            dropped.extend(removed)
        return kept, named(dropped)


def without_id_fields(payload: dict[str, object], id_fields: tuple[str, ...]) -> dict[str, object]:
    """The answer without the configured session-id members: it carries the id as `session_id`."""
    return {name: value for name, value in payload.items() if name not in id_fields}


def named(dropped: Iterable[str]) -> list[str]:
    """The names for `redacted_fields`: sorted, identifiers only, at most MAX_NAMED_FIELDS; any
    other dropped member is represented by one "..." entry."""
    names = sorted({name for name in dropped if _NAMEABLE.fullmatch(name)})
    listed = names[:MAX_NAMED_FIELDS]
    if len(listed) < len(set(dropped)):
        listed.append(UNNAMED_FIELDS)
    return listed


class DeclaredBody:
    """One POST route's request body: its model's members, plus the operator's pass-through ones."""

    def __init__(self, model: type[BaseModel], *, extra_fields: Iterable[str]) -> None:
        self._model = model
        self._known = frozenset(model.model_fields)
        self._extra = frozenset(extra_fields) - self._known

    def validate(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The members to forward; UnprocessableContent naming the first problem otherwise."""
        unknown = [name for name in payload if name not in self._known and name not in self._extra]
        if unknown:
            raise UnprocessableContent(
                f"The body has {_quoted(unknown)}, which this proxy does not accept; send only the "
                "documented fields."
            )
        declared = {name: value for name, value in payload.items() if name in self._known}
        try:
            model = self._model.model_validate(declared, strict=True)
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(part) for part in error["loc"]) or "the body"
            raise UnprocessableContent(f"Field {where!r}: {error['msg']}.") from None
        forwarded = model.model_dump(include=set(declared))
        forwarded.update((name, value) for name, value in payload.items() if name in self._extra)
        return forwarded


def _quoted(names: list[str]) -> str:
    shown = [orjson.dumps(name[:_MAX_QUOTED_CHARS]).decode() for name in names[:_MAX_QUOTED_FIELDS]]
    more = len(names) - len(shown)
    what = "an unknown field" if len(names) == 1 else "unknown fields"
    return f"{what} {', '.join(shown)}" + (f" and {more} more" if more else "")

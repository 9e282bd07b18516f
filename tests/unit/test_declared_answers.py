"""The declared shapes on their own (api/declared.py): request bodies checked member by member, and
answers reduced to an allow list that no face image gets through, in the shapes a reviewer used
against the old deny list (issue 17) or in shapes Hypothesis invents.

A result reaches the caller as the handler shapes it (api/handlers.py `_result`): reduced, the
configured id members replaced by the id the caller asked for, `redacted_fields` added, encoded.
`caller_body` below does the same with the same functions, so the property is about the bytes a
caller would receive. The settings of the property tests are in properties.py (derandomized)."""

from __future__ import annotations

import base64
import io
import math
import random
import re
import struct
import zlib
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, quote_from_bytes

import hypothesis
import orjson
import pytest
from hypothesis import strategies as st
from PIL import Image

from liveness_proxy.api.bodies import encode_upstream
from liveness_proxy.api.declared import (
    MAX_NAMED_FIELDS,
    SESSION_TOKEN_ANSWER,
    UNNAMED_FIELDS,
    DeclaredAnswer,
    DeclaredBody,
    is_session_token,
    named,
    result_answer,
    session_answer,
    without_id_fields,
)
from liveness_proxy.errors import UnprocessableContent
from liveness_proxy.privacy import BiometricFilter
from liveness_proxy.schemas import CreateSessionRequest, SessionTokenRequest
from properties import PROPERTIES, json_values, unicode_text

# --- real images --------------------------------------------------------------------------------


def noise_png(width: int = 24, height: int = 24, seed: int = 17) -> bytes:
    """A real PNG (RGB, 8 bits) of deterministic noise: noise does not compress, so every byte of
    it is image data a leak would carry."""
    rng = random.Random(seed)
    scanlines = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines, 9))
        + chunk(b"IEND", b"")
    )


def noise_jpeg(size: int = 32, seed: int = 29) -> bytes:
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


PNG = noise_png()
JPEG = noise_jpeg()
IMAGES = {"png": PNG, "jpeg": JPEG}
# What must never reach a caller: any 48-character run of an image's base64 (both alphabets, every
# byte alignment), hex (either case) or percent-encoding. Shorter runs carry too little to matter,
# and the size bound below limits how many of them fit in an answer.
LEAK_RUN = 48
# The largest result answer a caller can get under the default settings: the declared members and
# at most 8 short names; an image is larger than this, so none fits whatever its encoding.
MAX_ANSWER_BYTES = 1024


def _forms(image: bytes) -> list[str]:
    forms = []
    for offset in range(3):
        part = image[offset:]
        forms += [base64.b64encode(part).decode(), base64.urlsafe_b64encode(part).decode()]
    forms += [image.hex(), image.hex().upper(), quote_from_bytes(image, safe="")]
    return forms


def _runs(forms: Iterable[str]) -> frozenset[str]:
    return frozenset(form[i : i + LEAK_RUN] for form in forms for i in range(len(form) - LEAK_RUN + 1))


LEAK_RUNS = _runs(form for image in IMAGES.values() for form in _forms(image))


def leaked_runs(text: str) -> list[str]:
    return [
        text[i : i + LEAK_RUN] for i in range(len(text) - LEAK_RUN + 1) if text[i : i + LEAK_RUN] in LEAK_RUNS
    ]


def test_the_images_are_real_images_and_the_leak_check_sees_them() -> None:
    for image, kind in ((PNG, "PNG"), (JPEG, "JPEG")):
        decoded = Image.open(io.BytesIO(image))
        decoded.load()
        assert decoded.format == kind
        assert len(image) > MAX_ANSWER_BYTES
    # The check itself: a plain image in any of its forms is seen, an unrelated text is not.
    for form in _forms(JPEG):
        assert leaked_runs(f'{{"x":"{form[100:200]}"}}')
    assert not leaked_runs(base64.b64encode(bytes(range(256)) * 4).decode())


# --- how a result reaches the caller ------------------------------------------------------------

REQUESTED = "4b1d1c3e-5a7f-4e0a-9d6b-2f8e1a3c5d70"
ID_FIELDS = ("session_id",)
DENY = ("reference_image", "audit_images")


def caller_body(answer: DeclaredAnswer, payload: dict[str, Any]) -> bytes:
    """The body the result route sends for `payload` (api/handlers.py `_result`, without the
    optional `passed`)."""
    reduced, dropped = answer.reduce(payload)
    body = without_id_fields(reduced, ID_FIELDS)
    if any(name in reduced for name in ID_FIELDS):
        body = {"session_id": REQUESTED, **body}
    if dropped:
        body["redacted_fields"] = dropped
    return encode_upstream(body, 200)


# The default settings, and the two ways an operator relaxes the second line (the image
# heuristics): neither may let anything more through, because the allow list comes first.
RESULT_ANSWERS = {
    "default": DeclaredAnswer(result_answer(ID_FIELDS), extra_fields=(), biometrics=BiometricFilter(DENY)),
    "strip-biometrics-false": DeclaredAnswer(
        result_answer(ID_FIELDS), extra_fields=(), biometrics=BiometricFilter(DENY, enabled=False)
    ),
    "biometric-allow-fields": DeclaredAnswer(
        result_answer(ID_FIELDS),
        extra_fields=(),
        biometrics=BiometricFilter(
            DENY, allow_fields=("image", "face", "selfie", "status", "confidence", "session_id", "data")
        ),
    ),
}


def assert_nothing_leaks(body: bytes) -> None:
    text = body.decode()
    assert len(body) < MAX_ANSWER_BYTES, f"{len(body)} bytes reach the caller"
    assert not leaked_runs(text), f"image data reaches the caller: {leaked_runs(text)[0]}"
    shaped = orjson.loads(body)
    assert set(shaped) <= {"session_id", "status", "confidence", "redacted_fields"}
    assert shaped.get("session_id", REQUESTED) == REQUESTED
    assert len(shaped.get("redacted_fields", [])) <= MAX_NAMED_FIELDS + 1


# --- the shapes of the review -------------------------------------------------------------------


def _b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


# Each of the shapes the reviewer passed through the deny list (issue 17).
REVIEWED_SHAPES: dict[str, Callable[[bytes], Any]] = {
    "base64-after-a-space": lambda image: " " + _b64(image),
    "data-uri-after-a-newline": lambda image: "\ndata:image/png;base64," + _b64(image),
    "png-prefix": lambda image: "png:" + _b64(image),
    "base64-split-by-padding": lambda image: "==".join(_chunks(_b64(image), 200)),
    "json-inside-a-string": lambda image: orjson.dumps({"image": _b64(image)}).decode(),
    "percent-escaped": lambda image: quote_from_bytes(image, safe=""),
    "percent-escaped-base64": lambda image: quote(_b64(image), safe=""),
    "chunks-in-a-list": lambda image: _chunks(_b64(image), 500),
    "chunks-as-keys": lambda image: dict.fromkeys(_chunks(_b64(image), 500), True),
    "byte-integers": list,
}

# Where an image is hidden: the declared names too (their checks must refuse it), the deny list's,
# and names nobody lists.
CARRIER_NAMES = (
    st.sampled_from(
        ["status", "confidence", "session_id", "reference_image", "audit_images", "image", "selfie", "data"]
    )
    | st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,39}", fullmatch=True)
    | unicode_text(max_size=12)
)


# Beside the image: a little other JSON (cheap to draw; the image is what matters).
SIBLINGS = st.dictionaries(
    st.text(max_size=4), st.none() | st.booleans() | st.integers() | st.text(max_size=6), max_size=2
)


@st.composite
def hidden(draw: st.DrawFn, value: Any) -> Any:
    """`value` as is, or nested a few levels deep in objects (under any name) and arrays, beside
    other JSON."""
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            value = {**draw(SIBLINGS), draw(CARRIER_NAMES): value}
        else:
            value = [*draw(SIBLINGS).values(), value, *draw(SIBLINGS).values()]
    return value


@st.composite
def result_payloads(draw: st.DrawFn, carried: st.SearchStrategy[Any]) -> dict[str, Any]:
    """A result answer: plausible members (or not), and `carried` under one name at the top (or,
    when it is an object, its members at the top: image chunks as the answer's own member names)."""
    payload: dict[str, Any] = draw(SIBLINGS)
    if draw(st.booleans()):
        payload["session_id"] = REQUESTED
    if draw(st.booleans()):
        payload["status"] = draw(st.sampled_from(["CREATED", "SUCCEEDED", "FAILED", "EXPIRED"]))
    if draw(st.booleans()):
        payload["confidence"] = draw(st.floats(0, 100))
    value = draw(carried)
    if isinstance(value, dict) and draw(st.booleans()):
        payload.update(value)
    else:
        payload[draw(CARRIER_NAMES)] = value
    return payload


def assert_no_configuration_leaks(payload: dict[str, Any]) -> None:
    for answer in RESULT_ANSWERS.values():
        assert_nothing_leaks(caller_body(answer, payload))


@pytest.mark.parametrize("image_kind", sorted(IMAGES))
@pytest.mark.parametrize("shape", sorted(REVIEWED_SHAPES))
def test_no_reviewed_shape_of_an_image_reaches_the_caller(shape: str, image_kind: str) -> None:
    """Under each configuration (RESULT_ANSWERS), wherever the shape is hidden."""
    carried = REVIEWED_SHAPES[shape](IMAGES[image_kind])

    @hypothesis.settings(PROPERTIES, max_examples=20)
    @hypothesis.given(result_payloads(hidden(carried)))
    def check(payload: dict[str, Any]) -> None:
        assert_no_configuration_leaks(payload)

    check()


# --- shapes Hypothesis invents ------------------------------------------------------------------

ENCODINGS: dict[str, Callable[[bytes], str]] = {
    "base64": lambda data: base64.b64encode(data).decode(),
    "base64url": lambda data: base64.urlsafe_b64encode(data).decode(),
    "base64-unpadded": lambda data: base64.b64encode(data).decode().rstrip("="),
    "base64-mime": lambda data: base64.encodebytes(data).decode(),
    "base32": lambda data: base64.b32encode(data).decode(),
    "base85": lambda data: base64.b85encode(data).decode(),
    "ascii85": lambda data: base64.a85encode(data).decode(),
    "hex": lambda data: data.hex(),
    "HEX": lambda data: data.hex().upper(),
    "percent": lambda data: quote_from_bytes(data, safe=""),
    "latin-1": lambda data: data.decode("latin-1"),
}


@st.composite
def invented_shapes(draw: st.DrawFn) -> Any:
    """An image (or most of it, from any byte), encoded, decorated, split and laid out as Hypothesis
    chooses, possibly encoded again as JSON or a URI, and hidden anywhere."""
    return draw(hidden(draw(_encoded_image())))


@st.composite
def _encoded_image(draw: st.DrawFn) -> Any:
    image = IMAGES[draw(st.sampled_from(sorted(IMAGES)))]
    image = image[draw(st.integers(0, 64)) :]
    text = ENCODINGS[draw(st.sampled_from(sorted(ENCODINGS)))](image)
    prefix = draw(st.sampled_from(["", " ", "\n", "\t", "png:", "data:image/jpeg;base64,", "data:,", "x"]))
    text = prefix + text + draw(st.sampled_from(["", " ", "==", "\n", "!"]))
    if draw(st.booleans()):
        text = draw(st.sampled_from(["==", " ", "\n", ",", "|", "\\"])).join(
            _chunks(text, draw(st.integers(1, 700)))
        )
    layout = draw(st.sampled_from(["string", "list", "keys", "values", "json", "uri", "bytes"]))
    if layout == "string":
        return text
    size = draw(st.integers(1, 700))
    if layout == "list":
        return _chunks(text, size)
    if layout == "keys":
        return dict.fromkeys(_chunks(text, size), draw(st.none() | st.integers()))
    if layout == "values":
        return {f"k{index}": chunk for index, chunk in enumerate(_chunks(text, size))}
    if layout == "json":
        return orjson.dumps(draw(st.sampled_from([[text], {"v": text}, text]))).decode()
    if layout == "uri":
        return quote(text, safe="")
    return list(image)


@hypothesis.settings(PROPERTIES, max_examples=300)
@hypothesis.given(payload=result_payloads(invented_shapes()))
def test_no_invented_shape_of_an_image_reaches_the_caller(payload: dict[str, Any]) -> None:
    assert_no_configuration_leaks(payload)


@hypothesis.settings(PROPERTIES, max_examples=150)
@hypothesis.given(
    payload=st.dictionaries(
        CARRIER_NAMES
        | st.text(min_size=41, max_size=60)
        | st.from_regex(r"[0-9.-][a-z]{0,4}", fullmatch=True),
        st.none() | st.integers() | st.text(max_size=4),
        max_size=30,
    )
)
def test_redacted_fields_is_bounded_and_names_only_identifiers(payload: dict[str, Any]) -> None:
    _reduced, dropped = RESULT_ANSWERS["default"].reduce(payload)
    names = [name for name in dropped if name != UNNAMED_FIELDS]
    assert len(names) <= MAX_NAMED_FIELDS
    assert names == sorted(set(names))
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,39}", name) for name in names)
    assert set(names) <= set(payload)
    # "..." stands for every dropped member not named, and only then.
    undeclared = {name for name in payload if name not in ("session_id", "status", "confidence")}
    if undeclared - set(names):
        assert dropped[-1] == UNNAMED_FIELDS


# --- the allow list, by example -----------------------------------------------------------------


def test_each_answer_keeps_only_its_declared_members() -> None:
    image = base64.b64encode(PNG).decode()
    biometrics = BiometricFilter(DENY)
    token = DeclaredAnswer(SESSION_TOKEN_ANSWER, extra_fields=(), biometrics=biometrics)
    session = DeclaredAnswer(session_answer(("session_id", "id")), extra_fields=(), biometrics=biometrics)
    result = RESULT_ANSWERS["default"]
    assert token.reduce({"session_token": "sst_abc", "expires_in": 300, "trace": "t", "session_id": "s"}) == (
        {"session_token": "sst_abc", "expires_in": 300},
        ["session_id", "trace"],
    )
    assert session.reduce(
        {"id": "abc", "session_id": "abc", "status": "CREATED", "expires_in": 180, "confidence": 5}
    ) == ({"id": "abc", "session_id": "abc", "status": "CREATED", "expires_in": 180}, ["confidence"])
    assert result.reduce(
        {
            "session_id": REQUESTED,
            "status": "SUCCEEDED",
            "confidence": 98.5,
            "reference_image": {"bytes": image},
            "audit_images": [{"bytes": image}],
            "liveness_score": 0.9,
            "expires_in": 3,
        }
    ) == (
        {"session_id": REQUESTED, "status": "SUCCEEDED", "confidence": 98.5},
        ["audit_images", "expires_in", "liveness_score", "reference_image"],
    )


@pytest.mark.parametrize(
    ("member", "value"),
    [
        ("status", 1),
        ("status", ""),
        ("status", "SUCCEEDED!"),
        ("status", "S" * 33),
        ("status", ["SUCCEEDED"]),
        ("confidence", "98"),
        ("confidence", True),
        ("confidence", -0.1),
        ("confidence", 100.5),
        ("confidence", None),
        ("session_id", 7),
        ("session_id", "a/b"),
        ("session_id", "x" * 129),
    ],
    ids=repr,
)
def test_a_declared_member_of_the_wrong_type_or_bounds_is_dropped_and_named(member: str, value: Any) -> None:
    reduced, dropped = RESULT_ANSWERS["default"].reduce({"status": "CREATED", member: value})
    assert reduced == ({} if member == "status" else {"status": "CREATED"})
    assert dropped == [member]


def test_a_session_token_answer_is_checked_member_by_member() -> None:
    token = DeclaredAnswer(SESSION_TOKEN_ANSWER, extra_fields=(), biometrics=BiometricFilter(DENY))
    for value in ("", "a b", "é", "x" * 4097, 5, None):
        assert token.reduce({"session_token": value, "expires_in": 10}) == (
            {"expires_in": 10},
            ["session_token"],
        )
    for lifetime in (-1, 10_000_001, 1.5, "300", True):
        assert token.reduce({"session_token": "t", "expires_in": lifetime}) == (
            {"session_token": "t"},
            ["expires_in"],
        )
    assert token.reduce({"session_token": "!" + "~" * 4095}) == ({"session_token": "!" + "~" * 4095}, [])


# How the base64 of an image file opens (standard and URL-safe alphabets), and a data: URI: a
# session token is passed on verbatim, so its own check refuses these.
IMAGE_OPENINGS = {
    "png": "iVBORw0KGgo",
    "jpeg": "/9j/",
    "jpeg-url-safe": "_9j_",
    "gif": "R0lGOD",
    "webp": "UklGR",
    "data-uri": "data:image/png;base64,",
    "data-uri-upper-case": "DATA:image/jpeg;base64,",
    "data-uri-any-type": "data:,",
}


@pytest.mark.parametrize("opening", sorted(IMAGE_OPENINGS))
def test_a_session_token_that_opens_like_an_encoded_image_is_no_session_token(opening: str) -> None:
    value = IMAGE_OPENINGS[opening] + "AAAAAQAAAAEI" * 8
    assert not is_session_token(value)
    token = DeclaredAnswer(SESSION_TOKEN_ANSWER, extra_fields=(), biometrics=BiometricFilter(DENY))
    assert token.reduce({"session_token": value, "expires_in": 10}) == ({"expires_in": 10}, ["session_token"])


def test_the_real_images_encoded_are_no_session_tokens_and_ordinary_tokens_are() -> None:
    for image in IMAGES.values():
        encoded = base64.b64encode(image).decode()
        for value in (encoded, base64.urlsafe_b64encode(image).decode(), "data:image/png;base64," + encoded):
            assert len(value) <= 4096  # refused for how it opens, not for its length
            assert not is_session_token(value)
    ordinary = [
        "sst_" + "A" * 40,
        "sst_iVBORw0KGgo",  # an opening anywhere but at the start is just characters
        "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",  # JWT-like
        "9j_token",
        "database-token",
        "dat:a",
        "R0lGO",  # shorter than the GIF opening
        "t",
    ]
    for value in ordinary:
        assert is_session_token(value), value


def test_named_lists_at_most_eight_identifiers_and_stands_in_for_the_rest() -> None:
    assert named([]) == []
    assert named(["b", "a", "a"]) == ["a", "b"]
    assert named(["a b"]) == [UNNAMED_FIELDS]
    assert named(["x" * 41]) == [UNNAMED_FIELDS]
    assert named(["x" * 40]) == ["x" * 40]
    many = [f"field_{index:02}" for index in range(12)]
    assert named(many) == [*many[:MAX_NAMED_FIELDS], UNNAMED_FIELDS]


# --- operator-allowed members: the image heuristics still apply ---------------------------------


def _with_extra(biometrics: BiometricFilter) -> DeclaredAnswer:
    return DeclaredAnswer(
        result_answer(ID_FIELDS),
        extra_fields=("vendor", "portrait", "reference_image"),
        biometrics=biometrics,
    )


def test_an_allowed_member_holding_an_image_is_still_removed_by_default() -> None:
    image = base64.b64encode(PNG).decode()
    payload = {
        "status": "SUCCEEDED",
        "vendor": {"name": "cyn", "thumb": image},
        "portrait": image,
        "reference_image": {"bytes": image},
        "other": 1,
    }
    reduced, dropped = _with_extra(BiometricFilter(DENY)).reduce(payload)
    assert reduced == {"status": "SUCCEEDED", "vendor": {"name": "cyn"}}
    assert dropped == ["other", "portrait", "reference_image", "thumb"]
    # Allowed by name in the second line: its own value passes; the deny list still wins.
    reduced, dropped = _with_extra(
        BiometricFilter(DENY, allow_fields=["portrait", "reference_image"])
    ).reduce(payload)
    assert reduced == {"status": "SUCCEEDED", "vendor": {"name": "cyn"}, "portrait": image}
    assert dropped == ["other", "reference_image", "thumb"]
    # The second line off: every allowed member passes as it is; the undeclared one still does not.
    reduced, dropped = _with_extra(BiometricFilter(DENY, enabled=False)).reduce(payload)
    assert reduced == {key: value for key, value in payload.items() if key != "other"}
    assert dropped == ["other"]


def test_relaxing_the_second_line_never_widens_the_allow_list() -> None:
    image = base64.b64encode(PNG).decode()
    payload = {"status": "SUCCEEDED", "reference_image": {"bytes": image}, "portrait": image}
    for biometrics in (
        BiometricFilter(DENY, enabled=False),
        BiometricFilter((), allow_fields=["reference_image", "portrait"]),
    ):
        answer = DeclaredAnswer(result_answer(ID_FIELDS), extra_fields=("vendor",), biometrics=biometrics)
        assert answer.reduce(payload) == ({"status": "SUCCEEDED"}, ["portrait", "reference_image"])


# --- request bodies -----------------------------------------------------------------------------

CREATE = DeclaredBody(CreateSessionRequest, extra_fields=("note", "locale"))
TOKEN = DeclaredBody(SessionTokenRequest, extra_fields=("note",))


def refusal(body: DeclaredBody, payload: dict[str, Any]) -> str:
    with pytest.raises(UnprocessableContent) as refused:
        body.validate(payload)
    return str(refused.value.detail)


def test_only_declared_and_allowed_members_are_forwarded() -> None:
    assert CREATE.validate({"session_token": "sst_a", "note": {"any": [1, None]}}) == {
        "session_token": "sst_a",
        "note": {"any": [1, None]},
    }
    assert TOKEN.validate({}) == {}
    assert TOKEN.validate({"note": "n"}) == {"note": "n"}


@pytest.mark.parametrize(
    ("payload", "named_in_detail"),
    [
        ({"session_token": 123}, "'session_token'"),
        ({"session_token": ""}, "'session_token'"),
        ({"session_token": "x" * 4097}, "'session_token'"),
        ({"session_token": "a b"}, "'session_token'"),
        ({"session_token": "tok\n"}, "'session_token'"),
        ({"session_token": "tök"}, "'session_token'"),
        ({"session_token": None}, "'session_token'"),
        ({"session_token": ["t"]}, "'session_token'"),
        ({}, "'session_token'"),
        ({"note": "only"}, "'session_token'"),
        ({"session_token": "t", "bogus": 1}, '"bogus"'),
        ({"session_token": "t", "Session_Token": "t"}, '"Session_Token"'),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_a_create_body_outside_its_declaration_is_refused_naming_the_member(
    payload: dict[str, Any], named_in_detail: str
) -> None:
    assert named_in_detail in refusal(CREATE, payload)


def test_unknown_names_are_quoted_and_bounded_in_the_refusal() -> None:
    detail = refusal(TOKEN, {"a" * 10_000: 1})
    assert '"' + "a" * 64 + '"' in detail
    assert "a" * 65 not in detail
    detail = refusal(TOKEN, {'x"\n<b>\u202e': 1})
    assert '"x\\"\\n<b>\u202e"' in detail  # quoted as a JSON string: a quote or newline cannot break out
    detail = refusal(TOKEN, {f"f{index}": index for index in range(20)})
    assert detail.count('"f') == 5
    assert "and 15 more" in detail
    assert len(refusal(TOKEN, {f"{index}" * 500: index for index in range(100)})) < 600


@hypothesis.settings(PROPERTIES, max_examples=150)
@hypothesis.given(
    payload=st.dictionaries(
        st.sampled_from(["session_token", "note", "locale", "Session_Token", "x"])
        | unicode_text(max_size=12),
        st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=8) | json_values(),
        max_size=4,
    )
)
def test_any_body_is_forwarded_within_its_declaration_or_refused(payload: dict[str, Any]) -> None:
    try:
        forwarded = CREATE.validate(payload)
    except UnprocessableContent as refused:
        detail = str(refused.detail)
        assert len(detail) < 600
        unknown = set(payload) - {"session_token", "note", "locale"}
        if unknown:
            assert "unknown field" in detail
        return
    assert set(forwarded) <= {"session_token", "note", "locale"}
    assert forwarded == payload
    token = forwarded["session_token"]
    assert isinstance(token, str)
    assert 0 < len(token) <= 4096
    assert all("!" <= char <= "~" for char in token)


def test_confidence_bounds_are_finite() -> None:
    # NaN and infinities never come from JSON, but a transport that allowed them must not pass them.
    reduced, dropped = RESULT_ANSWERS["default"].reduce({"confidence": math.nan})
    assert (reduced, dropped) == ({}, ["confidence"])
    reduced, dropped = RESULT_ANSWERS["default"].reduce({"confidence": math.inf})
    assert (reduced, dropped) == ({}, ["confidence"])

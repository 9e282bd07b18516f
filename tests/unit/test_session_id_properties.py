"""Property-based tests (Hypothesis) of the session-id validator and the pattern the OpenAPI document
serves for it (split from the former test_properties.py; the round trip to the upstream is in
integration/test_upstream_answer_properties.py).

Every test runs with `derandomize=True` and no example database: CI checks the same examples on
every run and machine, so a failure is reproducible from the test name alone. The cost is that
runs do not explore new inputs over time; the example counts are set for each test to take at most
a few seconds."""

from __future__ import annotations

import re
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from liveness_proxy.api.bodies import session_id_from
from liveness_proxy.api.openapi import SESSION_ID_PATTERN as DOCUMENTED_SESSION_ID_PATTERN
from liveness_proxy.api.openapi import build_openapi
from liveness_proxy.api.paths import SESSION_ID_PATTERN
from liveness_proxy.errors import (
    UpstreamMalformed,
)

PROPERTIES = hypothesis.settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)

SESSION_ID_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _unicode_text(**kwargs: Any) -> st.SearchStrategy[str]:
    """Any text a Python str can hold and UTF-8 can encode (no lone surrogates)."""
    return st.text(alphabet=st.characters(exclude_categories=["Cs"]), **kwargs)


# --- 1. The session-id validator ----------------------------------------------------------------


def _documented_session_id(candidate: str) -> bool:
    """The README's rule, written without a regular expression."""
    return 1 <= len(candidate) <= 128 and set(candidate) <= SESSION_ID_ALPHABET


def _session_id_candidates() -> st.SearchStrategy[str]:
    valid_character = st.sampled_from(sorted(SESSION_ID_ALPHABET))
    near_misses = st.builds(
        lambda prefix, odd, suffix: prefix + odd + suffix,
        st.text(valid_character, max_size=64),
        st.sampled_from(
            ["/", ".", "..", "%2F", "%", "?", "#", " ", "\n", "\x00", "\\", "é", "٣", "\uff21", "\u200b"]
        ),
        st.text(valid_character, max_size=64),
    )
    return st.one_of(
        st.text(valid_character, min_size=0, max_size=130),
        near_misses,
        _unicode_text(max_size=140),
    )


@PROPERTIES
@hypothesis.given(candidate=_session_id_candidates())
def test_a_session_id_is_accepted_exactly_when_it_is_1_to_128_of_the_documented_characters(
    candidate: str,
) -> None:
    expected = _documented_session_id(candidate)
    assert (SESSION_ID_PATTERN.fullmatch(candidate) is not None) is expected
    # The same rule guards ids the upstream hands out (create-session answers).
    if expected:
        assert session_id_from({"session_id": candidate}, ["session_id"], 201) == candidate
    else:
        with pytest.raises(UpstreamMalformed):
            session_id_from({"session_id": candidate}, ["session_id"], 201)
    # The OpenAPI pattern says the same (JSON Schema's `$` is the end of the text, Python's `\Z`).
    documented = re.compile(DOCUMENTED_SESSION_ID_PATTERN.removesuffix("$") + r"\Z")
    assert (documented.search(candidate) is not None) is expected


def test_the_served_document_uses_the_session_id_pattern_on_both_session_routes() -> None:
    paths = build_openapi()["paths"]
    for path in ("/v1/liveness/sessions/{session_id}/result", "/v1/liveness/sessions/{session_id}"):
        (parameter,) = paths[path]["get"]["parameters"]
        assert parameter["schema"]["pattern"] == DOCUMENTED_SESSION_ID_PATTERN

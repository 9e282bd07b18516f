"""Property-based tests (Hypothesis) of the session-id validator and the pattern the OpenAPI document
serves for it (split from the former test_properties.py; the round trip to the upstream is in
integration/test_upstream_answer_properties.py).

The settings (derandomized, no example database) and the strategies the property tests share are
in properties.py, which says why."""

from __future__ import annotations

import re

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
from properties import PROPERTIES, SESSION_ID_ALPHABET, unicode_text

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
        unicode_text(max_size=140),
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
        (parameter,) = [p for p in paths[path]["get"]["parameters"] if p["in"] == "path"]
        assert parameter["name"] == "session_id"
        assert parameter["schema"]["pattern"] == DOCUMENTED_SESSION_ID_PATTERN

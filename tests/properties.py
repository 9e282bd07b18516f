"""What the property-based tests (Hypothesis: unit/test_*_properties.py and
integration/test_upstream_answer_properties.py) share: their settings, and the strategies and
constants more than one of them draws from.

Every test runs with `derandomize=True` and no example database: CI checks the same examples on
every run and machine, so a failure is reproducible from the test name alone. The cost is that
runs do not explore new inputs over time; the example counts are set for each test to take at most
a few seconds."""

from __future__ import annotations

import re
from typing import Any

import hypothesis
from hypothesis import strategies as st

PROPERTIES = hypothesis.settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)

SESSION_ID_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn about in proportion to its weight (st.one_of would merge
    repeated strategies, so repeating one does not weigh it)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(range(len(pool))).flatmap(lambda index: pool[index])


def unicode_text(**kwargs: Any) -> st.SearchStrategy[str]:
    """Any text a Python str can hold and UTF-8 can encode (no lone surrogates)."""
    return st.text(alphabet=st.characters(exclude_categories=["Cs"]), **kwargs)


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        unicode_text(max_size=20),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(unicode_text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    )


def nested(depth: int) -> bytes:
    """A JSON object holding arrays nested `depth` levels deep."""
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"

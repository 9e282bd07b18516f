"""The end-to-end tests' own collection rule for test_bench_smoke.py, which belongs to the benchmark
harness: it is slow (every benchmark scenario against nginx stubs, ~1 min) and in the xdist group
"heavy" (see tests/conftest.py)."""

from __future__ import annotations

import pytest

BENCH_SMOKE = "test_bench_smoke.py"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name == BENCH_SMOKE and item.path.parent.name == "e2e":
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.xdist_group("heavy"))

from __future__ import annotations

import time

import pytest

from liveness_proxy.sandbox import ManualClock, SystemClock


def test_manual_clock_starts_where_told() -> None:
    assert ManualClock(start=100.0).now() == 100.0


def test_manual_clock_advance_moves_it_forward() -> None:
    clock = ManualClock(start=100.0)
    clock.advance(2.5)
    assert clock.now() == 102.5


def test_manual_clock_refuses_to_run_backwards() -> None:
    with pytest.raises(ValueError, match="forward"):
        ManualClock().advance(-1)


def test_manual_clock_set_jumps_anywhere() -> None:
    clock = ManualClock(start=100.0)
    clock.set(50.0)
    assert clock.now() == 50.0


def test_manual_clock_refuses_non_finite_time() -> None:
    with pytest.raises(ValueError, match="finite"):
        ManualClock().set(float("nan"))


def test_system_clock_follows_the_wall_clock() -> None:
    before = time.time()
    assert before <= SystemClock().now() <= time.time()

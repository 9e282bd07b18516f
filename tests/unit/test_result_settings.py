"""The result-read settings: the reuse window's bounds, the store's on/off, and when the store is
active (never while images may pass)."""

from __future__ import annotations

from typing import Any

import pytest

from liveness_proxy.errors import ConfigurationError
from liveness_proxy.settings import settings_from_mapping
from liveness_proxy.wiring import final_result_store_line


def settings(**values: Any) -> Any:
    return settings_from_mapping(values)


def test_the_defaults_reuse_for_three_tenths_and_store_final_results() -> None:
    defaults = settings()
    assert defaults.liveness_proxy_result_reuse_seconds == 0.3
    assert defaults.liveness_proxy_final_result_store is True
    assert defaults.final_result_store_inactive is None
    assert final_result_store_line(defaults) == "on"


@pytest.mark.parametrize(
    ("value", "problem"), [(-0.1, "greater than or equal to 0"), (5.5, "less than or equal to 5")]
)
def test_a_reuse_window_out_of_range_is_refused_naming_the_setting(value: float, problem: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        settings(LIVENESS_PROXY_RESULT_REUSE_SECONDS=value)
    assert str(refused.value).startswith("LIVENESS_PROXY_RESULT_REUSE_SECONDS: ")
    assert problem in str(refused.value)


@pytest.mark.parametrize("value", [0, 5, "2.5"])
def test_a_reuse_window_within_range_is_taken(value: float | str) -> None:
    assert settings(LIVENESS_PROXY_RESULT_REUSE_SECONDS=value).liveness_proxy_result_reuse_seconds == float(
        value
    )


@pytest.mark.parametrize(("value", "on"), [("on", True), ("off", False), ("true", True), ("false", False)])
def test_the_store_is_switched_on_and_off(value: str, on: bool) -> None:
    assert settings(LIVENESS_PROXY_FINAL_RESULT_STORE=value).liveness_proxy_final_result_store is on


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"LIVENESS_PROXY_FINAL_RESULT_STORE": "off"}, "LIVENESS_PROXY_FINAL_RESULT_STORE is off"),
        ({"LIVENESS_PROXY_STRIP_BIOMETRICS": "false"}, "LIVENESS_PROXY_STRIP_BIOMETRICS is false"),
        (
            {"LIVENESS_PROXY_BIOMETRIC_ALLOW_FIELDS": "portrait"},
            "LIVENESS_PROXY_BIOMETRIC_ALLOW_FIELDS is set",
        ),
    ],
)
def test_the_store_is_inactive_while_off_or_while_images_may_pass(
    values: dict[str, str], reason: str
) -> None:
    configured = settings(**values)
    assert configured.final_result_store_inactive == reason
    assert final_result_store_line(configured) == f"off ({reason})"

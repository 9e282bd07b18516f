"""One route table: the Starlette routes, the OpenAPI paths and the Location header all come from it."""

from __future__ import annotations

import re

import pytest

from liveness_proxy.api.openapi import LOCATION_PATTERN, SESSION_ID_PATTERN, build_openapi
from liveness_proxy.api.paths import SESSION_ID_REGEX, session_result_location
from liveness_proxy.api.routes import ROUTES, RouteSpec, starlette_routes


def test_every_route_is_documented_at_its_path_and_method() -> None:
    paths = build_openapi()["paths"]
    documented = {(path, method.upper()) for path, methods in paths.items() for method in methods}
    assert documented == {(route.path, route.method) for route in ROUTES}
    for route in ROUTES:
        assert paths[route.path][route.method.lower()]["operationId"] == route.operation_id


def test_a_route_without_its_documentation_is_refused() -> None:
    with pytest.raises(ValueError, match="undocumentedOperation"):
        build_openapi((*ROUTES, RouteSpec("/new", "GET", "undocumentedOperation")))


def test_routes_are_built_in_table_order_and_every_route_needs_its_handler() -> None:
    async def handler(_request: object) -> object:
        raise AssertionError("not called")

    every = dict.fromkeys((route.operation_id for route in ROUTES), handler)
    built = starlette_routes(ROUTES, every)  # type: ignore[arg-type]
    # One route per path, where the path first appears: its methods are served together.
    assert [route.path for route in built] == list(dict.fromkeys(route.path for route in ROUTES))
    methods = {route.path: route.methods or set() for route in built}
    for spec in ROUTES:
        assert spec.method in methods[spec.path]
    without_metrics = {name: value for name, value in every.items() if name != "metrics"}
    with pytest.raises(ValueError, match="metrics"):
        starlette_routes(ROUTES, without_metrics)  # type: ignore[arg-type]
    optional = starlette_routes(ROUTES, without_metrics, optional=frozenset({"metrics"}))  # type: ignore[arg-type]
    assert "/metrics" not in [route.path for route in optional]
    with pytest.raises(ValueError, match="noSuchOperation"):
        starlette_routes(ROUTES, {**every, "noSuchOperation": handler})  # type: ignore[dict-item]


def test_the_location_header_matches_its_documented_pattern() -> None:
    assert f"^{SESSION_ID_REGEX}$" == SESSION_ID_PATTERN
    location = session_result_location("", "abc_DEF-123")
    assert re.fullmatch(LOCATION_PATTERN, location)
    assert session_result_location("/liveness", "x") == "/liveness/v1/liveness/sessions/x/result"

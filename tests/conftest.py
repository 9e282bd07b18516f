from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import Harness, ProxyHarness


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyHarness]:
    """A proxy in front of a sandbox upstream, with keys for alice, bob, an admin and carol."""
    with Harness(tmp_path) as running:
        yield running


@pytest.fixture
def make_proxy(tmp_path: Path) -> Callable[..., AbstractContextManager[ProxyHarness]]:
    """Builds a proxy with special settings: `with make_proxy(proxy_overrides={...}) as p:`."""
    counter = iter(range(1000))

    def build(**kwargs: Any) -> AbstractContextManager[ProxyHarness]:
        folder = tmp_path / f"harness-{next(counter)}"
        folder.mkdir()
        return Harness(folder, **kwargs)

    return build


@pytest.fixture
def client(proxy: ProxyHarness) -> Iterator[httpx.Client]:
    with proxy.client() as http:
        yield http

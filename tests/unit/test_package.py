"""The package is cheap to import: `import liveness_proxy` and `import liveness_proxy.errors` pull in
neither the web framework nor the database layer (the CLI's lazy imports and library users rely on
it), and the public names still resolve."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY_MODULES = ("starlette", "sqlalchemy", "uvicorn", "redis", "pydantic", "aiohttp", "structlog")

PROBE = """
import json, sys, time
started = time.perf_counter()
import {module}
seconds = time.perf_counter() - started
print(json.dumps({{"seconds": seconds, "modules": sorted(sys.modules)}}))
"""


def import_in_fresh_interpreter(module: str) -> tuple[float, list[str]]:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True, check=True
    )
    report = json.loads(completed.stdout)
    return float(report["seconds"]), list(report["modules"])


@pytest.mark.parametrize("module", ["liveness_proxy", "liveness_proxy.errors"])
def test_importing_the_package_or_its_errors_loads_nothing_heavy(module: str) -> None:
    seconds, modules = import_in_fresh_interpreter(module)
    loaded_heavy = [name for name in HEAVY_MODULES if name in modules]
    assert loaded_heavy == []
    ours = {name for name in modules if name.startswith("liveness_proxy")}
    assert ours <= {"liveness_proxy", "liveness_proxy._version", "liveness_proxy.errors"}
    # Relative to the app in the same interpreter kind, so a loaded machine slows both alike.
    app_seconds, _ = import_in_fresh_interpreter("liveness_proxy.app")
    assert seconds < app_seconds / 4


def test_public_names_resolve_lazily() -> None:
    import liveness_proxy

    assert liveness_proxy.__version__
    for name in liveness_proxy.__all__:
        assert getattr(liveness_proxy, name) is not None
    assert set(liveness_proxy.__all__) <= set(dir(liveness_proxy))
    with pytest.raises(AttributeError):
        _ = liveness_proxy.no_such_name

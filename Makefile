# Everything a new machine needs, from a fresh clone: `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# pytest-xdist workers for `make test` (2 pays on a 2-core machine; 0 runs in this process).
PYTEST_WORKERS ?= 2

.PHONY: setup demo test lint typecheck unit fast bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "liveness-proxy needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	@touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/liveness-proxy demo

lint: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/bandit --quiet --recursive src
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

# Every test (tests/unit, tests/integration, tests/e2e, tests/sandbox); the heavy e2e tests share one
# worker (xdist_group "heavy", see tests/conftest.py).
unit: setup
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup

# The developer's loop: everything but the tests marked slow.
fast: setup
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow"

test: lint typecheck unit

# Side-by-side benchmark (bench/README.md); installs wrk and nginx from Debian's packages if missing.
bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .liveness-demo

# One command each: `make test` (what CI runs), `make check`, `make demo`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tools of the tests, the checks and the benchmark (pytest, mypy, ruff, grpcio-tools),
# on top of what the sidecar and the demo need.
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: venv test check demo demo-shell protos bench fuzz clean

# The sidecar and what the demo needs; editable, so that `.venv/bin/sidecar` follows the
# working tree (after a `git pull` too).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

test: $(DEV_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: $(DEV_STAMP)
	$(BIN)/ruff check sidecar tests demo bench
	$(BIN)/ruff format --check sidecar tests demo bench
	$(BIN)/mypy

# The whole secured path on this machine: certificates, app, both sidecars, a session.
demo: $(STAMP)
	$(BIN)/python -m demo.run

# The same chain, left running under the interactive client until `exit`.
demo-shell: $(STAMP)
	$(BIN)/python -m demo.run --shell

# Regenerate demo/gen from protos/ (tests/test_demo.py fails when it is stale).
protos: $(DEV_STAMP)
	$(BIN)/python -m grpc_tools.protoc -Idemo/gen=protos --python_out=. \
		--grpc_python_out=. --pyi_out=. protos/*.proto

# The same load through no proxy, the sidecar, haproxy and nginx; rewrites BENCHMARKS.md.
bench: $(DEV_STAMP)
	$(BIN)/python -m bench.run --markdown BENCHMARKS.md --json bench/results.json

# tests/fuzz with a large budget: 25,000 examples per property (the HYPOTHESIS_PROFILE "fuzz"
# in tests/fuzz/conftest.py; `make test` runs the same properties with 100). About 50 minutes
# on a 2-core machine, 6 to 13 per property: no per-test timeout.
fuzz: $(DEV_STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/fuzz --timeout=0 \
		--hypothesis-show-statistics $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

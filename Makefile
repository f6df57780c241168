# One command each: `make test` (what CI runs), `make check`, `make demo`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test check demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/ruff check sidecar tests
	$(BIN)/ruff format --check sidecar tests
	$(BIN)/mypy

demo:
	@echo "make demo arrives with the demo issue (demo app, certificates, both sidecars)."
	@echo "Until then, README.md 'Quick start' shows the secured path by hand."
	@exit 1

bench:
	@echo "make bench arrives with the performance issue."
	@exit 1

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

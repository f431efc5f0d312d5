# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install serve test test-soak lint protos bench

install: $(INSTALLED)

# Re-installs only when pyproject.toml changes.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[server,dev]'
	touch $@

serve: install
	$(BIN)/viper serve

test: install lint
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

test-soak: install
	$(BIN)/python -m pytest -m soak

# Regenerates the gRPC stubs from protos/ (never edit them by hand).
protos: install
	$(BIN)/python protos/generate.py client

bench: install
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/metric.py

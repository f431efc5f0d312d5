# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install serve test test-soak lint protos bench

install: $(INSTALLED)

# The client (this folder) and the server (server/), editable; re-installs only when a pyproject.toml changes.
$(INSTALLED): pyproject.toml server/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]' -e ./server
	touch $@

serve: install
	$(BIN)/viper-server serve

test: install lint
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

test-soak: install
	$(BIN)/python -m pytest -m soak

# Regenerates the gRPC stubs from protos/ (never edit them by hand).
protos: install
	$(BIN)/python protos/generate.py generated

bench: install
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/metric.py

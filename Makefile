# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install serve test test-quick test-soak lint protos bench bench-gpu web

install: $(INSTALLED)

# The client (this folder), the profile store (profiles/), the server (server/) and the web gateway (web/),
# editable; re-installs only when a pyproject.toml changes.
$(INSTALLED): pyproject.toml profiles/pyproject.toml server/pyproject.toml web/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]' -e ./profiles -e ./server -e ./web
	touch $@

# On the defaults: the toy models (server/viper_server/toy), trained in a world of colours so that features,
# scores and images mean something, installed into var/models/toy on the first start.
serve: install
	$(BIN)/viper-server serve

# Worker processes for pytest-xdist: many tests wait on servers and subprocesses, so even 2 cores keep 3 busy.
# Each test module runs whole on one worker (--dist loadfile), so a module's shared server starts once; modules
# are handed out in the order tests/conftest.py gives (the slowest first), which xdist would otherwise replace
# by the number of tests in each (--no-loadscope-reorder).
TEST_WORKERS ?= 3
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: install lint
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) --durations=15

# The inner loop: everything but the slowest end-to-end modules (the browser, nginx in front of replicas, the
# client installed into a fresh virtualenv, the benches); `make test` and CI still run them.
test-quick: install
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) --ignore=tests/test_web_browser.py --ignore=tests/test_replicas.py \
		--ignore=tests/test_client_install.py --ignore=tests/test_benches.py \
		--ignore=tests/test_benches_load.py

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
	$(BIN)/python bench/concurrency.py
	$(BIN)/python bench/tracing.py
	$(BIN)/python bench/auth.py

# The generation, metric and concurrency benches at real size (--models full-random --device cuda), within 8
# minutes on one 80+ GB GPU: var/bench/gpu.md (the tables) and var/bench/gpu.json (the figures). Exits 2 without
# CUDA.
bench-gpu: install
	$(BIN)/python bench/gpu.py --out var/bench

# The web page in one command: `viper serve` on its defaults (127.0.0.1:50051, the toy models) and the gateway
# in front of it at http://127.0.0.1:8080. The server trusts the local development identity provider
# (viper-server dev-token, var/dev-identity), and the printed address signs the page in as alice with one of its
# JWTs. Ctrl-C stops both.
web: install
	@token=$$($(BIN)/viper-server dev-token --user alice) || exit 1; \
	$(BIN)/viper serve --auth-config var/dev-identity/auth.toml & server=$$!; \
	trap 'kill $$server 2>/dev/null' EXIT INT TERM; \
	echo "open http://127.0.0.1:8080/#token=$$token (signed in as alice; another user's token: viper-server dev-token --user NAME)"; \
	$(BIN)/viper-web --backend 127.0.0.1:50051 --port 8080

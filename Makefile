# fluxstream: `make serve` and `make test` do all their own set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# CPU machines get the pinned CPU build of torch; a machine with an NVIDIA driver gets
# PyPI's default (CUDA) build. Override either way: make serve TORCH_SPEC='torch==2.13.0'
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
STAMP := $(VENV)/.installed
CLUSTER_STAMP := $(VENV)/.installed-cluster
REPLICAS ?= 2

CHROMIUM ?= /usr/bin/chromium

.PHONY: install browser redis serve serve-cluster test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

$(CLUSTER_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,cluster]"
	touch $(CLUSTER_STAMP)

serve: $(STAMP)
	$(BIN)/python -m stream --host $(HOST) --port $(PORT) $(ARGS)

# Ray Serve replicas behind one endpoint; joins the cluster named by RAY_ADDRESS if set.
serve-cluster: $(CLUSTER_STAMP) redis
	$(BIN)/python -m stream.cluster --host $(HOST) --port $(PORT) --replicas $(REPLICAS) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check stream pipeline tests bench
	$(BIN)/ruff format --check stream pipeline tests bench
	$(BIN)/mypy stream pipeline

# The browser tests drive Debian's Chromium. Install it when it is missing and apt is usable
# (as root); otherwise those tests skip and say why.
browser:
	@test -x $(CHROMIUM) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
		>/dev/null 2>&1; } || echo "chromium could not be installed: the browser tests will skip"

# Debian's redis-server: replicas share jobs through it, and the shared-state tests start
# their own. Installed like Chromium; without it those tests skip and say why.
redis:
	@command -v redis-server >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server \
		>/dev/null 2>&1; } || echo "redis-server could not be installed: shared-state tests will skip"

test: lint browser redis $(CLUSTER_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.stream_overhead

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

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

.PHONY: install browser redis serve serve-cluster test lint image-test bench clean

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

# hadolint, yamllint and kubernetes-validate work offline. kubernetes-validate checks the plain
# Kubernetes objects and warns that it has no schema for the RayService (a custom resource).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy stream pipeline tests bench
	$(BIN)/hadolint Dockerfile
	$(BIN)/yamllint --strict .
	$(BIN)/kubernetes-validate --strict --quiet deploy/rayservice.yaml

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

# Builds the Dockerfile with the CPU build of torch, runs it, calls /health and one
# generation (deploy/image-test.sh; minutes, so not part of `make test`). Needs root for
# Debian's buildah, podman, runc and debootstrap, installed here when missing.
IMAGE_TOOLS := buildah podman runc debootstrap
image-test: $(STAMP)
	@for tool in $(IMAGE_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
		test -z "$$missing" || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq $$missing >/dev/null; }
	PIP=$(BIN)/pip bash deploy/image-test.sh

bench: $(STAMP)
	$(BIN)/python -m bench.stream_overhead

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

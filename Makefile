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

CHROMIUM ?= /usr/bin/chromium

.PHONY: install browser serve test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/python -m stream --host $(HOST) --port $(PORT) $(ARGS)

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

test: lint browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.stream_overhead

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

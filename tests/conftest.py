"""Shared fixtures. Two cores are shared by everything here: one torch thread per process."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", params=["qwen2_vl"])
def tiny_policy_dir(request, tmp_path_factory):
    """A freshly built tiny policy folder (random weights), built once per session and arch."""
    from core.policy import build_tiny_policy

    return build_tiny_policy(tmp_path_factory.mktemp(f"tiny_{request.param}"), arch=request.param, seed=0)

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



@pytest.fixture(scope="session")
def bootstrapped_run(tmp_path_factory):
    """`python -m cluster.bootstrap` at its real settings in a fresh folder (about 3-4 minutes on 2 cores).

    The one full bootstrap of the suite: the e2e test checks what it measured; tests that need a
    policy which reads the image (the engines' "the image matters") use its output.
    """
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    reuse = os.environ.get("SAEI_TEST_BOOTSTRAPPED")  # a local shortcut: an output_dir bootstrapped before
    if reuse:
        done = subprocess.CompletedProcess(args=[], returncode=0, stdout="bootstrapped policy: (reused)", stderr="")
        return {"output_dir": Path(reuse), "path": Path(reuse) / "tiny_policy" / "bootstrap", "proc": done}
    out = tmp_path_factory.mktemp("bootstrap")
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "cluster.bootstrap", "--config", str(repo / "configs/default.yaml"),
                           f"run.output_dir={out}"], cwd=out, env=env, capture_output=True, text=True, timeout=900)
    return {"output_dir": out, "path": out / "tiny_policy" / "bootstrap", "proc": proc}

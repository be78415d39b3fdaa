"""Shared fixtures and the test tiers. Two cores are shared by everything here: one torch thread per process.

Every test is marked by its folder (see pyproject.toml's markers): `unit` (pure: no Ray, no
subprocesses, no torch.distributed, no vLLM), `integration` (real processes, no Ray cluster), `ray`
(a local Ray cluster), `e2e` (the job as a user runs it), `gpu` (skipped without CUDA). `slow` marks
every test that needs the full bootstrap (`bootstrapped_run`) and those marked so in their file
because they take minutes. `make test-fast` runs what is neither slow nor beyond the quick tiers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moto_s3 import S3_BUCKET, s3_env, s3_server  # noqa: F401 (fixtures: one S3 server per session)

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TIERS = ("unit", "integration", "ray", "e2e", "gpu", "multinode")


def pytest_collection_modifyitems(config, items):
    skip_gpu = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        try:
            tier = Path(item.path).resolve().relative_to(TESTS).parts[0]
        except ValueError:  # a test file outside tests/ (given on the command line)
            tier = None
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        if "bootstrapped_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", params=["qwen2_vl"])
def tiny_policy_dir(request, tmp_path_factory):
    """A freshly built tiny policy folder (random weights), built once per session and arch."""
    from core.policy import build_tiny_policy

    return build_tiny_policy(tmp_path_factory.mktemp(f"tiny_{request.param}"), arch=request.param, seed=0)


def _bootstrap_cli(output_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "cluster.bootstrap", "--config", str(REPO / "configs/default.yaml"),
                           f"run.output_dir={output_dir}"], cwd=output_dir, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def bootstrapped_run(tmp_path_factory):
    """`python -m cluster.bootstrap` at its real settings in a fresh folder (about 3-4 minutes on 2 cores).

    The one full bootstrap of the suite: the e2e test checks what it measured; tests that need a
    policy which reads the image (the engines' "the image matters") use its output.
    Returns {"output_dir", "path" (the policy folder), "proc" (the CLI run), "reused"}.

    A local shortcut: SAEI_TEST_BOOTSTRAPPED=<an output_dir bootstrapped before> reuses that folder.
    The CLI still runs there (it finds the cached policy and trains nothing, so "proc" is that real
    run), and `reused` is True: tests that check what the bootstrap itself printed or measured on a
    fresh folder skip with the reason shown; tests that only need a bootstrapped policy use it.
    """
    reuse = os.environ.get("SAEI_TEST_BOOTSTRAPPED")
    if reuse:
        out = Path(reuse).resolve()
        if not (out / "tiny_policy" / "bootstrap" / "bootstrap.json").is_file():
            pytest.fail(f"SAEI_TEST_BOOTSTRAPPED={reuse}: no bootstrapped policy there "
                        "(tiny_policy/bootstrap/bootstrap.json); unset it to bootstrap in a fresh folder")
        proc = _bootstrap_cli(out, timeout=300)
        if "policy already at" not in proc.stdout:  # it trained again: the folder was not what it claimed
            pytest.fail(f"SAEI_TEST_BOOTSTRAPPED={reuse}: the bootstrap CLI did not find its cached policy:\n"
                        f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return {"output_dir": out, "path": out / "tiny_policy" / "bootstrap", "proc": proc, "reused": True}
    out = tmp_path_factory.mktemp("bootstrap")
    proc = _bootstrap_cli(out, timeout=900)
    return {"output_dir": out, "path": out / "tiny_policy" / "bootstrap", "proc": proc, "reused": False}

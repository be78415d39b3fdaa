"""`make train`'s first stage on a fresh folder: data, tiny policy, full supervised bootstrap.

This is the one test that runs the bootstrap at its real settings (about 3-4 minutes on 2 cores): the
embedded default is only useful to RL if the policy lands in the middle (some reward spread) and
reads the image (the attack perturbs pixels; a policy that ignores them cannot be moved).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bootstrap_cli_gives_a_middling_policy_that_reads_the_image(bootstrapped_run):
    if bootstrapped_run["reused"]:
        pytest.skip("SAEI_TEST_BOOTSTRAPPED is set: the bootstrap CLI did not run on a fresh folder, so its own "
                    "output and measurements are not this run's; unset it to test the bootstrap")
    proc, tmp_path = bootstrapped_run["proc"], bootstrapped_run["output_dir"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "tiny_policy/bootstrap/bootstrap.json").read_text())
    assert info["n_test"] == 200 and info["format_rate"] > 0.9
    # middling: sometimes right, with room for RL (the slip in the demonstrations caps total / more);
    # measured 0.64, 0.575 and 0.59 when the bootstrap took run.seed 0, 1, 2 (it now has its own seed, 0)
    assert 0.4 <= info["accuracy"] <= 0.75, info
    assert info["accuracy_by_family"]["count"] >= 0.9 and info["accuracy_by_family"]["more"] <= 0.6, info
    assert info["accuracy"] >= info["blank_accuracy"] + 0.1, info
    assert "bootstrapped policy:" in proc.stdout
    # the folder loads with stock loaders too (vLLM reads the image processor from this file)
    assert (tmp_path / "tiny_policy/bootstrap/preprocessor_config.json").is_file()
    # a second run finds the cached policy and does not train again
    again = subprocess.run([sys.executable, "-m", "cluster.bootstrap", f"run.output_dir={tmp_path}"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "policy already at" in again.stdout

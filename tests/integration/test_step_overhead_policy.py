"""bench/step_overhead.py times a bootstrapped policy, or random weights only when asked to."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_without_a_bootstrap_it_stops_and_names_the_flag(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench/step_overhead.py"), "--steps", "1",
                          f"run.output_dir={tmp_path}", "data.synthetic.n_train=4", "data.synthetic.n_test=2"],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled"))
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "error: no policy at" in out.stderr and "--random-policy" in out.stderr
    assert "saei_vs_grpo_step_ratio" not in out.stdout  # nothing was timed on a policy nobody asked for

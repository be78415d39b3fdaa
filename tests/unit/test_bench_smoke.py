"""The benchmarks run and print their ratios (no timing is asserted: these machines are noisy)."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_attack_bench_prints_ratios():
    out = subprocess.run([sys.executable, str(REPO / "bench/attack.py"), "--repeats", "1", "--prompts", "2",
                          "--tokens", "8"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("attack_vs_learner_ratio", "shared_vs_naive_ratio", "batched_vs_serial_ratio"):
        value = float(re.search(rf"^{name}=([0-9.]+)$", out.stdout, re.M).group(1))
        assert 0 < value < 100


def test_learner_bench_prints_ratio(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench/learner.py"), "--repeats", "1", "--n", "2",
                          "--response-tokens", "8", "--cache", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("learner_vs_plain_ratio", "learner_tokens_per_s", "plain_tokens_per_s"):
        value = float(re.search(rf"^{name}=([0-9.]+)$", out.stdout, re.M).group(1))
        assert value > 0

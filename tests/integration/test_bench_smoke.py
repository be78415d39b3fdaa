"""The benchmarks run and print their ratios (no timing is asserted: these machines are noisy)."""

import os
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


def test_rollout_bench_prints_ratio(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench/rollout.py"), "--prompts", "2", "--n", "2",
                          "--new-tokens", "4", "--repeats", "1", "--max-actors", "1", "--cache", str(tmp_path),
                          "--engines", "hf,vllm"],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled"))
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("pool_vs_engine_ratio", "pool_vs_engine_ratio_hf", "pool_vs_engine_ratio_vllm",
                 "vllm_vs_hf_engine_ratio", "vllm_vs_hf_pool_ratio"):
        assert float(re.search(rf"^{name}=([0-9.]+)$", out.stdout, re.M).group(1)) > 0, name


def test_step_overhead_bench_ends_with_its_ratio(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench/step_overhead.py"), "--steps", "1", "--random-policy",
                          f"run.output_dir={tmp_path}", "data.synthetic.n_train=16", "data.synthetic.n_test=4",
                          "data.batch_size=2", "rollout.n_clean=2", "rollout.n_adv=2",
                          "rollout.sampling.max_new_tokens=4"],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled"))
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"saei_vs_grpo_step_ratio=[0-9.]+", last), last


def test_weight_sync_bench_prints_its_ratio():
    out = subprocess.run([sys.executable, str(REPO / "bench/weight_sync.py"), "--shapes", "tiny", "--repeats", "1",
                          "--consumers", "2", "--bucket-mb", "1"], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env=dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled"))
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"broadcast_vs_object_store=[0-9.]+", last), last
    assert float(last.split("=")[1]) > 0


def test_attack_calibration_prints_a_gain_per_setting(tiny_policy_dir, tmp_path):
    from core import synthetic

    data = synthetic.write_split(tmp_path / "train.parquet", 2)
    out = subprocess.run([sys.executable, str(REPO / "bench/attack_calibration.py"), "--policy", str(tiny_policy_dir),
                          "--data", str(data), "--prompts", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [x for x in out.stdout.splitlines() if x.startswith("T=")]
    assert len(lines) == 6 and all("gain_of_means=" in x for x in lines), out.stdout

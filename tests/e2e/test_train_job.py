"""The job end to end through the real Ray pipeline: SaEI and GRPO steps, `ray job submit`, Prometheus
metrics and `ops scale` against a `ray start --head` cluster on 127.0.0.1.

The policy is the tiny one with random weights (the bootstrap has its own e2e test); the data is a
small synthetic split rendered into the test's folder.
"""

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from ray_head import stop_cluster

from cluster.metrics import prometheus_name, read_metrics
from core.devices import free_port
from core.policy import load_policy

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

STEP_KEYS = ["reward/mean", "reward/clean", "accuracy/clean", "entropy/clean", "response_length/mean",
             "rollout/tokens_per_s", "time/step_s", "time/generate_s", "time/attack_s", "time/learn_s",
             "time/sync_s"]
ADV_KEYS = ["reward/adversarial", "accuracy/adversarial", "entropy/adversarial", "tsec/before", "tsec/after"]
EVAL_KEYS = ["eval/accuracy", "eval/pass@k"]


def _env(**extra) -> dict:
    # the venv's bin first: `ray start` hands its PATH to job entrypoints (`python -m ...`)
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false", **extra)


def _overrides(out: Path, policy: Path, *extra: str) -> list[str]:
    return [f"run.output_dir={out}", f"model.path={policy}", "model.build_tiny=false",
            "data.synthetic.n_train=24", "data.synthetic.n_test=8", "data.batch_size=2", "data.limit_test=4",
            "rollout.sampling.max_new_tokens=8", "rollout.eval_k=2", "learner.micro_batch_size=4",
            "cluster.dashboard=false", "logging.progress_bar=false", *extra]



def _finite_keys(row: dict, keys: list[str]) -> None:
    for k in keys:
        assert k in row, f"{k} missing from {sorted(row)}"
        assert row[k] is not None and math.isfinite(row[k]), f"{k} = {row[k]}"


@pytest.mark.parametrize("name,extra", [
    ("saei", ["rollout.n_clean=2", "rollout.n_adv=2"]),
    ("grpo", ["rollout.n_clean=4", "rollout.n_adv=0", "adversary.kind=none"]),
    ("saei_vllm", ["rollout.n_clean=2", "rollout.n_adv=2", "rollout.engine=vllm", "rollout.kv_cache_gb=0.25"]),
])
def test_two_steps_through_the_ray_pipeline(tmp_path, tiny_policy_dir, name, extra):
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.train", f"run.name={name}", "run.steps=2", "run.eval_every=2",
         *_overrides(tmp_path, tiny_policy_dir, *extra)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = next(tmp_path.glob(f"{name}-*"))
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "time/step_s" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2] and [r["step"] for r in evals] == [0, 2]  # before training, at the end
    for r in steps:
        _finite_keys(r, STEP_KEYS + (ADV_KEYS if name.startswith("saei") else []))
        assert r["rollout/logprob_diff"] < 1e-4  # the engine serves the learner's weights
        if name == "grpo":
            assert r["reward/adversarial"] is None and r["tsec/before"] is None
    _finite_keys(evals[0], EVAL_KEYS)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {Path(p).name for p in summary["plots"]} >= {"reward.png", "entropy.png"}
    assert (run_dir / "tensorboard").is_dir() and (run_dir / "config.yaml").is_file()
    load_policy(summary["policy"])  # the final checkpoint is a loadable Hugging Face folder
    assert "run folder:" in proc.stdout and summary["checkpoint"] in proc.stdout


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with the dashboard (job API) and a known metrics port."""
    tmp = tmp_path_factory.mktemp("head")
    gcs, dash, metrics = free_port(), free_port(), free_port()
    env = _env(RAY_metrics_report_interval_ms="500")
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
                    "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180, cwd=tmp)
    yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "metrics": metrics, "tmp": tmp}
    stop_cluster(gcs)  # this cluster only: another Ray job on the machine keeps running


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def test_job_submit_metrics_and_ops_scale(head_node, tiny_policy_dir, tmp_path):
    """The production engine (vLLM, its CPU build here) under `ray job submit`, weights by broadcast;
    scaling adds a vLLM actor, and the weight group is rebuilt with it."""
    pytest.importorskip("vllm")
    out = tmp_path / "runs"
    job = subprocess.Popen(
        [str(BIN / "ray"), "job", "submit", "--address", head_node["dashboard"], "--working-dir", str(REPO),
         "--", "python", "-m", "cluster.train", "run.name=submitted", "run.steps=15", "run.eval_every=0",
         *_overrides(out, tiny_policy_dir, "rollout.n_clean=2", "rollout.n_adv=2", "rollout.engine=vllm",
                     "rollout.kv_cache_gb=0.25", "cluster.weight_sync=broadcast")],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    ops_env = _env(RAY_ADDRESS=head_node["address"])

    def ops(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster.ops", *args], env=ops_env, capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)

    status, deadline = {}, time.time() + 400
    while time.time() < deadline and job.poll() is None:
        res = ops("status")
        if res.returncode == 0:
            status = json.loads(res.stdout)
            if status.get("step", 0) >= 1:
                break
        time.sleep(1)
    if status.get("step", 0) < 1 and job.poll() is not None:
        pytest.fail(f"the job ended before its first step (exit {job.returncode}):\n{job.communicate()[0][-4000:]}")
    assert status.get("step", 0) >= 1, (status, job.poll())
    assert status["rollout_workers"] == 1
    scaled = ops("scale", "--rollout-workers", "2", "--wait", "300")
    assert scaled.returncode == 0, scaled.stdout + scaled.stderr

    scraped = ""
    while job.poll() is None and f"ray_{prometheus_name('entropy/clean')}" not in scraped:
        scraped = _scrape(head_node["metrics"])
        time.sleep(0.5)
    log = job.communicate(timeout=600)[0]
    assert job.returncode == 0, log[-4000:]
    assert "succeeded" in log
    if f"ray_{prometheus_name('entropy/clean')}" not in scraped:
        scraped = _scrape(head_node["metrics"])  # the node keeps the last values after the job
    for key in ("entropy/clean", "rollout/tokens_per_s", "tsec/after"):
        assert f"ray_{prometheus_name(key)}" in scraped, key
    rows = [r for r in read_metrics(next(out.glob("submitted-*")) / "metrics.jsonl") if "time/step_s" in r]
    assert rows[0]["rollout/workers"] == 1 and rows[-1]["rollout/workers"] == 2
    assert max(r["rollout/logprob_diff"] for r in rows) < 1e-4  # engines and learner agree on every step
    assert all(r["weight_sync/bytes"] > 0 and r["weight_sync/fallbacks"] == 0 for r in rows)


def test_broadcast_and_object_store_give_the_same_run(tmp_path, bootstrapped_run):
    """2 steps with 2 rollout workers, the weights synced by broadcast or through the object store: the
    same seeds give the same samples and the same metrics. The bootstrapped policy earns rewards, so
    the learner's weights move every step and a sync that lost anything would change step 2."""
    policy = bootstrapped_run["path"]
    assert bootstrapped_run["proc"].returncode == 0, bootstrapped_run["proc"].stderr[-2000:]
    runs = {}
    for sync in ("object_store", "broadcast"):
        proc = subprocess.run(
            [sys.executable, "-m", "cluster.train", f"run.name={sync}", "run.steps=2", "run.eval_every=0",
             "run.eval_before_train=false", f"cluster.weight_sync={sync}", "cluster.rollout_workers=2",
             "cluster.rollout_cpus=0.5", "cluster.adversary_cpus=0.5", "learner.lr=1e-4",
             *_overrides(tmp_path / sync, policy, "rollout.n_clean=2", "rollout.n_adv=2",
                         "rollout.sampling.max_new_tokens=24", "data.batch_size=4")],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[sync] = [r for r in read_metrics(next((tmp_path / sync).glob(f"{sync}-*")) / "metrics.jsonl")
                      if "time/step_s" in r]
    assert [r["step"] for r in runs["broadcast"]] == [1, 2]
    assert all(r["weight_sync/bytes"] > 0 and r["weight_sync/fallbacks"] == 0 for r in runs["broadcast"])
    assert all(r["weight_sync/bytes"] == 0 for r in runs["object_store"])
    timing = ("time/", "rollout/tokens_per_s", "learner/tokens_per_s", "weight_sync/")
    # Adversarial requests that arrive while the actors are busy leave together as one engine batch, so
    # how many tasks a step has (each checked once: rollout/weights_checked) and the engine's batch
    # layout (float32 noise in the engine's log-probs, rollout/logprob_diff ~3.5e-7) follow the timing.
    batching = ("rollout/weights_checked", "rollout/logprob_diff")
    for a, b in zip(runs["object_store"], runs["broadcast"]):
        same = {k: a[k] for k in a if not k.startswith(timing + batching)}
        assert same == {k: b[k] for k in same}, a["step"]
        for r in (a, b):  # what was left out still says the same thing in both runs
            assert r["rollout/logprob_diff"] < 1e-5, r
            assert r["step"] == 1 or r["rollout/weights_checked"] >= 1, r  # step 1 serves the folder's weights
    assert runs["broadcast"][-1]["reward/mean"] > 0  # the policy earned rewards: its weights moved

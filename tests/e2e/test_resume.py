"""Exact whole-job resume: a job SIGKILLed after its step-2 checkpoint and resumed with
`run.resume_from=latest` ends with the parameters of an uninterrupted 4-step run, bit for bit, with the
same metrics for steps 3-4 and one metrics file in which every step appears once. A checkpoint that a
kill cut short (no trainer_state.json) is never picked.

The policy is the suite's bootstrapped one: it earns rewards, so every step moves the weights and a
resume that lost anything (optimizer moments, RNG, data cursor, the rollout engines' weights) would
show in the parameters.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from cluster.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMING = ("time/", "rollout/tokens_per_s", "learner/tokens_per_s")


def _cmd(out: Path, policy: Path, name: str, *extra: str) -> list[str]:
    data = policy.parents[1] / "data" / "synthetic"
    return [sys.executable, "-m", "cluster.train", f"run.name={name}", f"run.output_dir={out}", "run.steps=4",
            "run.save_every=2", "run.eval_every=0", "run.eval_before_train=false", f"model.path={policy}",
            "model.build_tiny=false", f"data.train_files=[{data / 'train.parquet'}]",
            f"data.test_files=[{data / 'test.parquet'}]", "data.limit_test=4", "data.batch_size=4",
            "rollout.n_clean=2", "rollout.n_adv=2", "rollout.sampling.max_new_tokens=24", "rollout.eval_k=2",
            "learner.lr=1e-4", "cluster.dashboard=false", "logging.progress_bar=false", *extra]


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO),
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "checkpoints" / "step_000004" / "hf").glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    victims = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in victims:  # the driver and the local Ray cluster it started (GCS, raylet, workers)
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(victims, timeout=30)


def test_sigkill_after_step_2_then_resume_latest_is_bitwise_the_uninterrupted_run(bootstrapped_run, tmp_path):
    assert bootstrapped_run["proc"].returncode == 0, bootstrapped_run["proc"].stderr[-2000:]
    policy = bootstrapped_run["path"]
    whole = subprocess.run(_cmd(tmp_path, policy, "whole"), cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-4000:]

    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115
    job = subprocess.Popen(_cmd(tmp_path, policy, "killed"), cwd=tmp_path, env=_env(), stdout=log,
                           stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not list(tmp_path.glob("killed-*/checkpoints/step_000002/trainer_state.json")):
        assert job.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no step-2 checkpoint"
        time.sleep(0.1)
    _kill_tree(job)
    log.close()
    run = next(tmp_path.glob("killed-*"))
    assert not (run / "checkpoints" / "step_000004").exists()
    # a checkpoint a kill cut short: files but no trainer_state.json; `latest` must pass it by
    cut = run / "checkpoints" / "step_000003"
    if not cut.exists():
        (cut / "hf").mkdir(parents=True)
        (cut / "hf" / "model.safetensors").write_bytes(b"half a file")
    assert not (cut / "trainer_state.json").exists()

    resumed = subprocess.run(_cmd(tmp_path, policy, "killed", "run.resume_from=latest"), cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "step_000002" in resumed.stderr  # the log names the checkpoint it resumed from

    want, got = _weights(next(tmp_path.glob("whole-*"))), _weights(run)
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])][:5]
    # the weights moved: the comparison is not between two copies of the start
    start = load_file(next(Path(policy).glob("*.safetensors")))
    assert any(not torch.equal(start[k], want[k]) for k in want if k in start)

    steps = [r for r in read_metrics(run / "metrics.jsonl") if "time/step_s" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # one file, every step once
    whole_steps = [r for r in read_metrics(next(tmp_path.glob("whole-*")) / "metrics.jsonl") if "time/step_s" in r]
    for a, b in zip(whole_steps[2:], steps[2:]):
        same = {k: v for k, v in a.items() if not k.startswith(TIMING)}
        assert same == {k: b.get(k) for k in same}, a["step"]

"""Ctrl-C stops the job at a step boundary with a checkpoint and the command that resumes it.

A real short job (the tiny policy, a small synthetic split, tiny settings) gets SIGINT once step 1's
metrics line is in metrics.jsonl. The signal goes to the job's whole process group, as a terminal's
Ctrl-C does, so the local Ray cluster's processes get it too. The job must exit 130 with no
traceback, leave a complete checkpoint of the step it had reached, and print one line with the
command that resumes it; that command, run as printed, takes the run to its end in the same folder.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 4


def _cmd(out: Path, policy: Path) -> list[str]:
    return [sys.executable, "-m", "cluster.train", "--config", str(REPO / "configs" / "default.yaml"),
            "run.name=ctrlc", f"run.output_dir={out}", f"run.steps={STEPS}", "run.save_every=0", "run.eval_every=0",
            "run.eval_before_train=false", f"model.path={policy}", "model.build_tiny=false",
            "data.synthetic.n_train=24", "data.synthetic.n_test=8", "data.batch_size=2", "data.limit_test=2",
            "rollout.n_clean=2", "rollout.n_adv=2", "rollout.sampling.max_new_tokens=8", "rollout.eval_k=2",
            "learner.micro_batch_size=4", "cluster.dashboard=false", "logging.progress_bar=false"]


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO),
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if "time/step_s" in r] if path.exists() else []


def test_ctrl_c_checkpoints_at_the_step_boundary_and_the_printed_command_resumes(tmp_path, tiny_policy_dir):
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as log:
        job = subprocess.Popen(_cmd(tmp_path, tiny_policy_dir), cwd=tmp_path, env=_env(), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not any(1 in _steps(run) for run in tmp_path.glob("ctrlc-*")):
            assert job.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "no step-1 metrics line"
            time.sleep(0.2)
        os.killpg(job.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground process group
        code = job.wait(timeout=600)
    out = log_path.read_text()
    assert code == 130, out[-4000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    lines = [line for line in out.splitlines() if "resume with: python -m cluster.train" in line]
    assert len(lines) == 1 and "run.resume_from=latest" in lines[0], out[-4000:]
    argv = shlex.split(lines[0].split("resume with: ", 1)[1].split("  (", 1)[0])
    ckpt = Path(next(a for a in argv if a.startswith("run.resume_from=")).split("=", 1)[1])

    run = next(tmp_path.glob("ctrlc-*"))
    done = _steps(run)
    assert done == list(range(1, len(done) + 1)) and 1 <= len(done) < STEPS, done
    assert ckpt == run / "checkpoints" / f"step_{done[-1]:06d}"  # the step it had reached, saved at the boundary
    state = json.loads((ckpt / "trainer_state.json").read_text())  # written last: the checkpoint is complete
    assert state["client_state"]["step"] == done[-1]
    assert (ckpt / "hf" / "config.json").is_file()

    assert argv[:3] == ["python", "-m", "cluster.train"] and "--config" in argv
    resumed = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _steps(run) == list(range(1, STEPS + 1))  # the same folder, every step once
    assert (run / "checkpoints" / f"step_{STEPS:06d}" / "trainer_state.json").is_file()

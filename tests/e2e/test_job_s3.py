"""The job with its run in a bucket: `run.output_dir=s3://...` (a moto server, configured only through the
standard AWS environment), two steps, then `run.resume_from=latest` read from the bucket for two more.
Everything the run writes (checkpoints, metrics.jsonl, TensorBoard events, config, summary) is in the
bucket, in one run folder; nothing of the run is written next to the job's working directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

# the integration tier's moto server (one per session) and the AWS environment that points at it
from moto_s3 import S3_BUCKET

from core.storage import Storage

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _job(cwd: Path, out: str, policy: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cluster.train", "run.name=s3job", f"run.output_dir={out}", "run.save_every=2",
           "run.eval_every=0", "run.eval_before_train=false", f"model.path={policy}", "model.build_tiny=false",
           "data.synthetic.n_train=16", "data.synthetic.n_test=4", "data.batch_size=2", "data.limit_test=2",
           "rollout.n_clean=2", "rollout.n_adv=0", "adversary.kind=none", "rollout.sampling.max_new_tokens=8",
           "rollout.eval_k=1", "learner.micro_batch_size=4", "cluster.dashboard=false", "logging.progress_bar=false",
           "logging.plots=false", *extra]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_run_in_a_bucket_resumes_from_the_bucket(s3_env, tiny_policy_dir, tmp_path):  # noqa: F811
    # the job's processes and this test read the bucket through the same AWS_* variables (s3_env)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled",
               SAEI_CACHE_DIR=str(tmp_path / "cache"))
    out = f"s3://{S3_BUCKET}/e2e-{uuid.uuid4().hex[:8]}/runs"
    work = tmp_path / "work"
    work.mkdir()
    first = _job(work, out, tiny_policy_dir, env, "run.steps=2")
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = _job(work, out, tiny_policy_dir, env, "run.steps=4", "run.resume_from=latest")
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    runs = Storage(out).list()
    assert len(runs) == 1 and runs[0].startswith("s3job-"), runs  # the resume kept the run's folder
    run = Storage(out).join(runs[0])
    assert "step_000002" in resumed.stderr and run.uri in resumed.stderr  # resumed from the bucket's checkpoint
    files = run.list_files()
    for step in (2, 4):
        ckpt = f"checkpoints/step_{step:06d}"
        assert {f"{ckpt}/trainer_state.json", f"{ckpt}/dcp/.metadata", f"{ckpt}/rng/rank0.pt",
                f"{ckpt}/hf/config.json"} <= set(files), files
    rows = [json.loads(line) for line in run.read_text("metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if "time/step_s" in r] == [1, 2, 3, 4]  # one file in the bucket, each step once
    assert "config.yaml" in files and any(f.startswith("tensorboard/") for f in files)
    summary = json.loads(run.read_text("summary.json"))
    assert summary["run_dir"] == run.uri and summary["checkpoint"] == run.join("checkpoints/step_000004").uri
    assert f"run folder:  {run.uri}" in resumed.stdout
    assert list(work.iterdir()) == []  # the driver wrote nothing of the run beside it: all went to storage

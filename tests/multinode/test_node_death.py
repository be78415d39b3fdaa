"""A worker node dies mid-job (its raylet and every process on it, SIGKILLed by pid): the rollout actor that
ran there (and the adversary, when it did) comes back on the surviving node and the job finishes with every step's
groups once. The learner ranks are pinned to the head (`cluster.learner_resources`), so losing B costs
no rank. Node B is started again afterwards for the tests that follow.
"""

from __future__ import annotations

import json
import secrets
import time

import pytest
from test_job import EXCLUDES, _bucket, _steps, _where

pytestmark = [pytest.mark.multinode, pytest.mark.slow]
STEPS = 40  # ~1 s each: enough left after the kill for a replacement to load and serve

# Shares small enough that everything fits on the head alone once B is gone (2 logical CPUs).
ARGS = ["run.name=death", "run.eval_every=0", "run.eval_before_train=false", "run.save_every=0",
        "model.build_tiny=false", "data.synthetic.n_train=16", "data.synthetic.n_test=4", "data.limit_test=4",
        "data.batch_size=2", "rollout.n_clean=2", "rollout.n_adv=2", "rollout.sampling.max_new_tokens=8",
        "rollout.eval_k=2", "learner.num_workers=1", "learner.micro_batch_size=4", "cluster.rollout_workers=2",
        "cluster.learner_cpus=0.25", "cluster.rollout_cpus=0.25", "cluster.adversary_cpus=0.25",
        'cluster.learner_resources={head: 0.01}', "cluster.placement_timeout_s=120", "logging.sync_every_s=0",
        "logging.progress_bar=false", "logging.plots=false"]

WAIT_JOB = """\
from ray.job_submission import JobSubmissionClient, JobStatus
client = JobSubmissionClient(DASHBOARD)
deadline = time.time() + TIMEOUT
while client.get_job_status(SUBMISSION_ID) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    if time.time() > deadline:
        client.stop_job(SUBMISSION_ID)
        break
    time.sleep(2)
result = {"status": str(client.get_job_status(SUBMISSION_ID)), "logs": client.get_job_logs(SUBMISSION_ID)[-8000:]}
"""


def test_rollout_and_adversary_come_back_on_the_surviving_node(two_nodes, tiny_policy_dir):
    runs = f"s3://{two_nodes.bucket}/death-{secrets.token_hex(3)}"
    sid = f"death-{secrets.token_hex(3)}"
    cmd = [str(two_nodes.venv / "bin/ray"), "job", "submit", "--no-wait", "--address", two_nodes.dashboard_url,
           "--submission-id", sid, "--working-dir", str(two_nodes.repo),
           "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
           "--entrypoint-num-cpus", "0.25", "--entrypoint-resources", json.dumps({"head": 0.01}),
           "--", "python", "-m", "cluster.train", *ARGS, f"run.steps={STEPS}", f"run.output_dir={runs}",
           f"model.path={tiny_policy_dir}"]
    proc = two_nodes.run_in_a(cmd, env=two_nodes.driver_env(RAY_ADDRESS=two_nodes.dashboard_url), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deadline = time.monotonic() + 600
    while True:  # step 2 done: every role is up and has served
        listing = _bucket(two_nodes, runs)["files"]
        run = next((f.split("/")[0] for f in listing if f.endswith("/metrics.jsonl")), None)
        steps = _steps(_bucket(two_nodes, f"{runs}/{run}", "metrics.jsonl")["texts"].get("metrics.jsonl", "")) \
            if run else []
        if len(steps) >= 2:
            break
        assert time.monotonic() < deadline, "the job did not reach step 2"
        time.sleep(2)
    before = _where(two_nodes, sid)
    assert two_nodes.ip_b in before.get("RolloutActor", []), before  # something to lose on B
    t0 = time.monotonic()
    killed = two_nodes.kill_worker()
    print(f"\nkilled node B ({len(killed)} processes) after step {len(steps)}")
    try:
        assert len(steps) < STEPS // 2, "the kill came too late to test anything"
        done = two_nodes.py_in_a(WAIT_JOB, timeout=900, DASHBOARD=two_nodes.dashboard_url, SUBMISSION_ID=sid,
                                 TIMEOUT=600)
        print(f"job {done['status']} {time.monotonic() - t0:.1f} s after the kill")
        assert done["status"].endswith("SUCCEEDED"), done["logs"]
        got = _bucket(two_nodes, f"{runs}/{run}", "metrics.jsonl")
        rows = _steps(got["texts"]["metrics.jsonl"])
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step once
        after = _where(two_nodes, sid)
        print(f"roles before {before}, after {after}")
        # every step's groups whole: 2 prompts x 2 clean and 2 adversarial samples, none lost or duplicated
        assert all((r["samples/clean"], r["samples/adversarial"], r["samples/lost"], r["samples/duplicated"])
                   == (4, 4, 0, 0) for r in rows), [(r["step"], r["samples/lost"]) for r in rows]
        # the lost actor came back on A: restarted there by Ray (same actor, its new node) or replaced by the pool
        assert after["RolloutActor"].count(two_nodes.ip_a) >= 2, (after, done["logs"][-4000:])
    finally:
        two_nodes.restart_worker()

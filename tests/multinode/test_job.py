"""The training job as users run it: `ray job submit` to a two-node cluster whose worker shares no files
with the driver, outputs in a bucket (`run.output_dir=s3://...`), resumed from the bucket.

The first job's policy is a folder only the driver's host has (it reaches node B through Ray's object
store); the resumed job's policy is the same folder behind an s3:// URI (each node fetches it into its
own cache). Each role's node is read from Ray's state API, not from what the job says of itself.
"""

from __future__ import annotations

import json
import secrets
import time

import pytest

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

EXCLUDES = [".venv", ".git", "runs", ".gpukit", ".gpuextra", "**/__pycache__"]

# A small job: 2 learner ranks, 2 rollout actors, the adversary, broadcast weight sync, CPU shares that
# fit the two nodes' 2 + 2 logical CPUs beside the driver.
JOB_ARGS = ["run.name=mn", "run.eval_every=0", "run.eval_before_train=false", "run.save_every=2",
            "model.build_tiny=false", "data.synthetic.n_train=16", "data.synthetic.n_test=4", "data.limit_test=4",
            "data.batch_size=2", "rollout.n_clean=2", "rollout.n_adv=2", "rollout.sampling.max_new_tokens=8",
            "rollout.eval_k=2", "learner.num_workers=2", "learner.micro_batch_size=4", "cluster.rollout_workers=2",
            "cluster.learner_cpus=0.5", "cluster.rollout_cpus=0.5", "cluster.adversary_cpus=0.5",
            "cluster.weight_sync=broadcast", "logging.progress_bar=false", "logging.plots=false"]

# Storage as the job sees it, read from namespace A (the S3 server listens on A's address only).
READ_BUCKET = """\
import json, sys
from core.storage import Storage
root = Storage(sys.argv[1])
out = {"files": root.list_files(), "texts": {}}
for rel in sys.argv[2:]:
    if root.exists(rel):
        out["texts"][rel] = root.read_text(rel)
print("BUCKET " + json.dumps(out))
"""

UPLOAD = """\
import sys
from core.storage import Storage
Storage(sys.argv[2]).upload(sys.argv[1])
print("UPLOADED")
"""

# Where each actor of a submitted job ran, from Ray's state API: [[class name, node address], ...]
WHERE_ACTORS_RAN = """\
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors
info = JobSubmissionClient(DASHBOARD).get_job_info(SUBMISSION_ID)
job_id = info.driver_info.id if info.driver_info else None
ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
result = sorted([a.class_name, ips.get(a.node_id)] for a in list_actors(filters=[("job_id", "=", job_id)],
                                                                         limit=1000, detail=True))
"""


def _submit(cluster, args: list[str], submission_id: str, timeout: float = 900):
    cmd = [str(cluster.venv / "bin/ray"), "job", "submit", "--address", cluster.dashboard_url,
           "--submission-id", submission_id, "--working-dir", str(cluster.repo),
           "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
           "--entrypoint-num-cpus", "0.5", "--entrypoint-resources", json.dumps({"head": 0.01}),
           "--", "python", "-m", "cluster.train", *args]
    env = cluster.driver_env(RAY_ADDRESS=cluster.dashboard_url)
    deadline = time.monotonic() + 120
    while True:  # the head's job agent can take tens of seconds to come up on a loaded machine
        t0 = time.monotonic()
        proc = cluster.run_in_a(cmd, env=env, timeout=timeout)
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
        submission_id += "-again"
    print(f"\nray job submit {submission_id}: rc {proc.returncode}, {time.monotonic() - t0:.1f} s")
    return proc, submission_id


def _bucket(cluster, uri: str, *texts: str) -> dict:
    proc = cluster.run_in_a([str(cluster.venv / "bin/python"), "-c", READ_BUCKET, uri, *texts],
                            cwd=cluster.repo)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BUCKET ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("BUCKET "):])


def _where(cluster, submission_id: str) -> dict[str, list[str]]:
    seen = cluster.py_in_a(WHERE_ACTORS_RAN, DASHBOARD=cluster.dashboard_url, SUBMISSION_ID=submission_id)
    out: dict[str, list[str]] = {}
    for cls, ip in seen:
        out.setdefault(cls, []).append(ip)
    return out


def _steps(metrics_text: str) -> list[dict]:
    rows = [json.loads(ln) for ln in metrics_text.splitlines() if ln.strip()]
    return [r for r in rows if "time/step_s" in r]


def test_submitted_job_runs_on_both_nodes_writes_the_bucket_and_resumes_from_it(two_nodes, tiny_policy_dir):
    runs = f"s3://{two_nodes.bucket}/runs-{secrets.token_hex(3)}"
    first, sid = _submit(two_nodes, [*JOB_ARGS, "run.steps=2", f"run.output_dir={runs}",
                                     f"model.path={tiny_policy_dir}"], f"mn-first-{secrets.token_hex(3)}")
    assert first.returncode == 0 and "succeeded" in first.stdout.lower(), first.stdout[-6000:] + first.stderr[-3000:]

    where = _where(two_nodes, sid)
    print(f"roles: {where}")
    assert sorted(where.get("LearnerActor", [])) and len(where["LearnerActor"]) == 2, where
    assert sorted(where.get("RolloutActor", [])) == sorted([two_nodes.ip_a, two_nodes.ip_b]), where  # spread
    assert len(where.get("AdversaryActor", [])) == 1, where
    assert {ip for ips in where.values() for ip in ips} >= {two_nodes.ip_a, two_nodes.ip_b}

    listing = _bucket(two_nodes, runs)["files"]
    folders = sorted({f.split("/")[0] for f in listing if f.startswith("mn-")})
    assert len(folders) == 1, listing
    run = folders[0]
    got = _bucket(two_nodes, f"{runs}/{run}", "metrics.jsonl", "summary.json",
                  "checkpoints/step_000002/trainer_state.json")
    files = set(got["files"])
    ckpt = "checkpoints/step_000002"
    assert {f"{ckpt}/trainer_state.json", f"{ckpt}/rng/rank0.pt", f"{ckpt}/rng/rank1.pt", f"{ckpt}/dcp/.metadata",
            "config.yaml", "metrics.jsonl", "summary.json"} <= files, sorted(files)
    assert len([f for f in files if f.startswith(f"{ckpt}/dcp/") and f.endswith(".distcp")]) == 2, sorted(files)
    assert any(f.startswith(f"{ckpt}/hf/") and f.endswith(".safetensors") for f in files), sorted(files)
    steps = _steps(got["texts"]["metrics.jsonl"])
    assert [r["step"] for r in steps] == [1, 2]
    # every sync crossed the two addresses over gloo; a silent fallback to the object store fails here
    assert all(r["weight_sync/fallbacks"] == 0 for r in steps), [r["weight_sync/fallbacks"] for r in steps]
    summary = json.loads(got["texts"]["summary.json"])
    assert summary["checkpoint"].startswith(f"{runs}/{run}/"), summary
    assert f"{runs}/{run}" in first.stdout  # the job prints where its outputs are

    # the same policy behind a URI: each node fetches it from the bucket into its own cache
    policy = f"s3://{two_nodes.bucket}/policies/tiny-{secrets.token_hex(3)}"
    up = two_nodes.run_in_a([str(two_nodes.venv / "bin/python"), "-c", UPLOAD, str(tiny_policy_dir), policy],
                            cwd=two_nodes.repo)
    assert "UPLOADED" in up.stdout, up.stdout + up.stderr
    second, _ = _submit(two_nodes, [*JOB_ARGS, "run.steps=4", f"run.output_dir={runs}", "run.resume_from=latest",
                                    f"model.path={policy}"], f"mn-resume-{secrets.token_hex(3)}")
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
    got = _bucket(two_nodes, f"{runs}/{run}", "metrics.jsonl", "checkpoints/step_000004/trainer_state.json")
    assert [r["step"] for r in _steps(got["texts"]["metrics.jsonl"])] == [1, 2, 3, 4]  # one folder, each step once
    assert json.loads(got["texts"]["checkpoints/step_000004/trainer_state.json"])["client_state"]["step"] == 4
    assert f"resumed from {runs}/{run}/{ckpt}" in second.stdout, second.stdout[-4000:]

"""Two jobs in one namespace each have their own ops controller: starting one never kills the other's,
`cluster.ops --run` reaches the one it names, and without `--run` the CLI lists the jobs instead of
guessing. The second job is a real second Ray job: a driver process of its own on the same cluster."""

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cluster import ops

REPO = Path(__file__).resolve().parents[2]

OTHER_JOB = r"""
import sys, ray
from cluster import ops
ray.init(address=sys.argv[1], namespace=sys.argv[2], logging_level="ERROR", log_to_driver=False)
c = ops.start_controller(sys.argv[2], sys.argv[3], rollout_workers=5)
ray.get(c.report.remote({"state": "running", "step": 3}))
print("READY", ray.get_runtime_context().get_job_id(), flush=True)
sys.stdin.read()  # alive (and its controller with it) until the test closes stdin
"""


@pytest.fixture
def other_job(ray_cluster):
    """A second driver (another Ray job) on the test's cluster that runs `run-b` in a fresh namespace."""
    ns = f"ops2-{uuid.uuid4().hex[:6]}"
    gcs = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", OTHER_JOB, gcs, ns, "run-b"], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        pytest.fail(f"the second driver did not start: {line}{proc.stderr.read()[-3000:]}")
    yield ns, line.split()[1]
    proc.stdin.close()
    proc.wait(timeout=60)


def test_two_jobs_keep_their_own_controllers(ray_cluster, other_job, capsys):
    ray = ray_cluster
    ns, other_id = other_job
    mine = ops.start_controller(ns, "run-a", rollout_workers=1)  # the old code killed run-b's here
    assert ops.running_jobs(ns) == ["run-a", "run-b"]
    theirs = ray.get_actor(ops.controller_name("run-b"), namespace=ns)
    assert ray.get(theirs.get_status.remote())["ray_job_id"] == other_id != ray.get_runtime_context().get_job_id()

    # without --run the CLI does not guess: one line naming both jobs, exit 2
    assert ops.main(["--namespace", ns, "status"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "run-a, run-b" in err and "--run" in err

    assert ops.main(["--namespace", ns, "--run", "run-b", "status"]) == 0
    out = capsys.readouterr().out
    assert '"run": "run-b"' in out and '"rollout_workers": 5' in out and '"step": 3' in out

    # a resize reaches the job it names and no other
    assert ops.main(["--namespace", ns, "--run", "run-a", "scale", "--rollout-workers", "2"]) == 0
    assert ray.get(mine.take_request.remote()) == 2
    assert ray.get(theirs.get_status.remote())["requested_rollout_workers"] is None

    # an unknown name lists what runs
    assert ops.main(["--namespace", ns, "--run", "run-c", "status"]) == 2
    err = capsys.readouterr().err
    assert "match --run 'run-c'" in err and "run-a, run-b" in err
    ray.kill(mine)


def test_the_same_run_name_of_another_job_is_refused_and_left_alone(ray_cluster, other_job):
    ray = ray_cluster
    ns, other_id = other_job
    with pytest.raises(RuntimeError, match=rf"another running job \(Ray job {other_id}\).*'{ns}'.*run.name"):
        ops.start_controller(ns, "run-b", rollout_workers=1)
    theirs = ray.get_actor(ops.controller_name("run-b"), namespace=ns)
    assert ray.get(theirs.get_status.remote())["rollout_workers"] == 5  # still the other job's, untouched


def test_the_only_job_is_found_without_run_and_a_run_started_again_replaces_its_own(ray_cluster, capsys):
    ray = ray_cluster
    ns = f"ops1-{uuid.uuid4().hex[:6]}"
    assert ops.main(["--namespace", ns, "status"]) == 2
    assert "no running SaEI job in namespace" in capsys.readouterr().err
    first = ops.start_controller(ns, "run-x-20250101", rollout_workers=1)
    second = ops.start_controller(ns, "run-x-20250101", rollout_workers=4)  # this driver's own: replaced
    assert ops.running_jobs(ns) == ["run-x-20250101"]
    assert ops.main(["--namespace", ns, "--run", "run-x", "status"]) == 0  # a prefix only it has
    assert '"rollout_workers": 4' in capsys.readouterr().out
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(first.get_status.remote(), timeout=60)
    ray.kill(second)

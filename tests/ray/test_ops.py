"""`python -m cluster.ops`: a clear error without a cluster, and a `scale --wait` that says why it gave up."""

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from cluster import ops
from core.devices import free_port

REPO = Path(__file__).resolve().parents[2]


def _ops_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # without RAY_ADDRESS from the caller's shell: the test names the (dead) address itself
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "cluster.ops", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_missing_cluster_is_one_error_line_naming_the_address():
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    res = _ops_cli("--address", dead, "status")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert dead in lines[0] and "--address" in lines[0] and "RAY_ADDRESS" in lines[0]
    assert "Traceback" not in res.stderr


def test_missing_cluster_named_by_ray_address():
    dead = f"127.0.0.1:{free_port()}"
    res = _ops_cli("scale", "--rollout-workers", "2", env={"RAY_ADDRESS": dead})
    assert res.returncode == 2 and res.stderr.startswith("error:") and dead in res.stderr, res.stderr


def test_scale_wait_timeout_says_what_it_waited_for(ray_cluster, capsys):
    ns = f"ops-{uuid.uuid4().hex[:6]}"
    controller = ops.start_controller(ns, "run-x", rollout_workers=1)
    ray_cluster.get(controller.report.remote({"state": "running", "step": 7}))
    rc = ops.main(["--namespace", ns, "scale", "--rollout-workers", "3", "--wait", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "waited 1 s" in err and "report 3 rollout workers" in err and "it reports 1" in err, err
    assert "step 7" in err and "pending" in err, err
    ray_cluster.kill(controller)


def test_scale_wait_returns_once_the_job_reports_the_size(ray_cluster, capsys):
    ns = f"ops-{uuid.uuid4().hex[:6]}"
    controller = ops.start_controller(ns, "run-y", rollout_workers=1)

    def driver():  # what cluster.train does between steps
        for _ in range(200):
            wanted = ray_cluster.get(controller.take_request.remote())
            if wanted is not None:
                ray_cluster.get(controller.report.remote({"rollout_workers": wanted, "step": 2}))
                return
            time.sleep(0.1)

    t = threading.Thread(target=driver)
    t.start()
    rc = ops.main(["--namespace", ns, "scale", "--rollout-workers", "2", "--wait", "60"])
    t.join()
    assert rc == 0 and "rollout pool is now 2 workers (step 2)" in capsys.readouterr().out
    ray_cluster.kill(controller)

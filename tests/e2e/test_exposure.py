"""Nothing a running job listens on is reachable beyond loopback, and its Ray cluster wants the token.

A real short job runs as a user runs it (`python -m cluster.train` in a subprocess, the plain
environment: no RAY_* variable from the test, the job starts its own local cluster), with the pieces
that open sockets: two learner ranks (the gloo group), two rollout actors (their engines: transformers,
or vLLM with its engine processes), the adversary, the broadcast weight group
(`cluster.weight_sync=broadcast`), the dashboard and the metrics endpoint. Mid-run, every listening
TCP socket of the job's whole process tree (the driver, and below it GCS, raylet, the agents, every
worker and the vLLM processes) is listed; each must be bound to 127.0.0.0/8 or ::1. On failure the
offending (process, address, port) are printed.

Token authentication stays on (Ray's default for a new local cluster): a driver that sends no token is
refused, one with the cluster's token gets in.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from ray_head import kill_all

from cluster.metrics import read_metrics

# What the job may take from the test's environment: the test must not hand it what `make train` does not
RAY_VARS = ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")

CLIENT = r"""
import sys, ray
try:
    ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False)
    print("CONNECTED", ray.cluster_resources().get("CPU"))
    ray.shutdown()
except Exception as e:
    cause = f"{e} <- {e.__cause__}" if e.__cause__ else str(e)
    print("REFUSED", type(e).__name__, cause.replace(chr(10), " "))
"""


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _plain_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARS}
    env["OMP_NUM_THREADS"] = "1"  # two cores shared by every process of the job
    return env


def _tree(root: int) -> list[psutil.Process]:
    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _listening(procs: list[psutil.Process]) -> dict[tuple[str, int], str]:
    """{(address, port): process title} of every listening TCP socket of `procs`."""
    found = {}
    for p in procs:
        try:
            cmd = p.cmdline()
            # the program's own name first: a long install path must not push it past the cut (CI's is longer)
            title = " ".join([os.path.basename(cmd[0]), *cmd[1:]])[:80] if cmd else p.name()
            conns = p.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                found[(c.laddr.ip, c.laddr.port)] = f"{p.pid} {title}"
    return found


def _gcs_address(log: Path) -> str | None:
    """The job's cluster address, as it logs it (the gcs_server's command line says port 0: Ray picks one)."""
    m = re.search(r"local Ray cluster at (\S+)", log.read_text())
    return m[1] if m else None


def _token() -> str:
    """The token of a new local cluster: RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else
    ~/.ray/auth_token (created by `ray.init` when missing: ray/_private/authentication)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").read_text().strip()


def _client(address: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """A driver joining `address` on this machine's loopback cluster. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 as
    the job has it (without it the client looks for a raylet on the external address); two tries to
    reach the GCS instead of 20, so a refusal takes seconds."""
    env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_gcs_server_port_wait_time_s="2")
    return subprocess.run([sys.executable, "-c", CLIENT, address], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _refused(proc: subprocess.CompletedProcess) -> bool:
    """Refused by the cluster's authentication, not merely unreachable."""
    return "CONNECTED" not in proc.stdout and "REFUSED" in proc.stdout and "InvalidAuthToken" in proc.stdout


def _check_auth(address: str, tmp_path: Path) -> None:
    # without the token: this client sends none (auth off on its side), the cluster must refuse it
    plain = _client(address, dict(_plain_env(), RAY_AUTH_MODE="disabled"), 180)
    assert _refused(plain), plain.stdout + plain.stderr[-3000:]
    # a wrong token is refused too
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    bad = _client(address, dict(_plain_env(), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(wrong)), 180)
    assert _refused(bad), bad.stdout + bad.stderr[-3000:]
    # with the cluster's token: accepted
    good = tmp_path / "token"
    good.write_text(_token())
    ok = _client(address, dict(_plain_env(), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(good)), 240)
    assert ok.returncode == 0 and "CONNECTED" in ok.stdout, ok.stdout + ok.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a job start (minutes on 2 shared cores) and three client connections
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_every_listening_socket_of_a_running_job_is_loopback(tmp_path, tiny_policy_dir, engine):
    assert not _loopback("0.0.0.0") and not _loopback("::") and not _loopback("10.1.2.3")  # the check can fail
    if engine == "vllm":
        pytest.importorskip("vllm")  # tests/integration/test_install.py fails when the cpu extra should have it
    # a small KV cache (what VLLM_CPU_KVCACHE_SPACE sets; the engine takes it from the config)
    extra = ["rollout.engine=vllm", "rollout.kv_cache_gb=0.25"] if engine == "vllm" else []
    cmd = [sys.executable, "-m", "cluster.train", f"run.name=exposure_{engine}", f"run.output_dir={tmp_path}",
           "run.steps=1000", "run.eval_every=0", "run.eval_before_train=false", f"model.path={tiny_policy_dir}",
           "model.build_tiny=false", "data.synthetic.n_train=48", "data.synthetic.n_test=8", "data.limit_test=4",
           "data.batch_size=2", "rollout.n_clean=2", "rollout.n_adv=2", "rollout.sampling.max_new_tokens=8",
           "learner.num_workers=2", "learner.micro_batch_size=4", "cluster.rollout_workers=2",
           "cluster.weight_sync=broadcast", "logging.progress_bar=false", *extra]  # dashboard on: the default
    env = _plain_env()
    log = open(tmp_path / "job.log", "w")  # noqa: SIM115
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    sockets: dict[tuple[str, int], str] = {}
    try:
        deadline = time.monotonic() + 900
        steps = 0
        while steps < 3:  # every actor is up and the broadcast group has carried two syncs
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the job did not reach step 3"
            files = list(tmp_path.glob(f"exposure_{engine}-*/metrics.jsonl"))
            steps = len([r for r in read_metrics(files[0]) if "time/step_s" in r]) if files else 0
            sockets.update(_listening(_tree(job.pid)))
            time.sleep(1)
        gcs = _gcs_address(tmp_path / "job.log")
        assert gcs is not None, "the job did not log its cluster address"
        _check_auth(gcs, tmp_path)
        for _ in range(5):  # a few more samples across steps: sockets that come and go with a sync
            sockets.update(_listening(_tree(job.pid)))
            time.sleep(1)
        # the clients above talked to a live cluster and the listing saw a running job
        assert job.poll() is None, (tmp_path / "job.log").read_text()[-4000:]
    finally:  # run.steps is more than the test waits for: it ends the job, and the cluster it started
        kill_all(_tree(job.pid), timeout=60)
        job.wait(timeout=60)
    print(f"{len(sockets)} listening sockets:")
    for (ip, port), who in sorted(sockets.items(), key=lambda x: x[1]):
        print(f"  {ip}:{port}  {who}")
    titles = " ".join(sockets.values())
    # the listing covers the pieces that open sockets, so an exposed one could not hide
    for piece in ("gcs_server", "raylet", "LearnerActor", "AdversaryActor", "RolloutActor"):
        assert piece in titles, f"no listening socket of {piece}: {sorted(sockets.items())}"
    exposed = sorted((who, ip, port) for (ip, port), who in sockets.items() if not _loopback(ip))
    assert not exposed, "listening beyond loopback (process, address, port):\n" + "\n".join(map(str, exposed))

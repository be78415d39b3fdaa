"""A shared two-node Ray cluster on one machine, the two nodes two hosts in all but hardware.

Node A (head) and node B (worker) live in their own network namespaces joined by a veth pair, each
with its own 10.x.y.0/24 address; B also runs in a private mount namespace where the checkout and
/tmp are hidden by tmpfs (only the Python environment is bound back), so B sees neither the project's
code (the editable install points into the hidden checkout) nor the driver's files. Token auth is on,
each node reading its token from its own place. An S3-compatible server (moto) runs in A.

Needs root and `ip netns`; skipped otherwise. Processes are started and stopped by pid only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import netns
import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
GCS_PORT, DASHBOARD_PORT, S3_PORT = 6379, 8265, 5000  # Ray's defaults: fine inside own namespaces
BUCKET = "saei-multinode"
NODE_CPUS = 2
OBJECT_STORE_BYTES = 200 * 1024 * 1024

# Prepended to every driver snippet run in A: connects with the environment's address and token;
# `on(role, fn, *args)` runs fn as a task pinned to the node holding custom resource `role`.
DRIVER_PRELUDE = """\
import json, os, sys, time
import ray
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="ERROR")
def on(role, fn, *args, runtime_env=None):
    task = ray.remote(num_cpus=0, resources={role: 1}, max_retries=0, runtime_env=runtime_env)(fn)
    return ray.get(task.remote(*args), timeout=120)
"""

# Whether each path can be read from each node: "ok" or the exception's class name.
PROBE_PATHS = """\
def probe(paths):
    out = {}
    for p in paths:
        try:
            with open(p, "rb") as f:
                f.read(1)
            out[p] = "ok"
        except Exception as e:
            out[p] = type(e).__name__
    return out
result = {role: on(role, probe, PATHS) for role in ("head", "worker")}
"""

WAIT_NODES_AND_BUCKET = """\
deadline = time.time() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2:
    if time.time() > deadline:
        raise SystemExit(f"not two alive nodes after 120 s: {ray.nodes()}")
    time.sleep(0.5)
import pyarrow.fs as pafs
scheme, host = os.environ["AWS_ENDPOINT_URL"].split("://")
pafs.S3FileSystem(scheme=scheme, endpoint_override=host, allow_bucket_creation=True).create_dir(BUCKET)
result = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
"""


class TwoNodes:
    """The running cluster: addresses, what a client needs, and the handles to run and kill things."""

    def __init__(self, net: netns.Net, work: Path):
        self.net = net
        self.ip_a, self.ip_b = net.ip_a, net.ip_b
        self.repo, self.venv, self.work = REPO, VENV, work  # work: host folder under /tmp (hidden on B)
        self.token = secrets.token_hex(32)
        self.token_path_a = self._write_token("a")  # what a client in A needs (with RAY_AUTH_MODE=token)
        self.token_path_b = self._write_token("b")  # B reads it once, then keeps its own copy
        self.head_address = f"{self.ip_a}:{GCS_PORT}"
        self.dashboard_url = f"http://{self.ip_a}:{DASHBOARD_PORT}"
        self.bucket = BUCKET
        self.aws_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_ENDPOINT_URL": f"http://{self.ip_a}:{S3_PORT}"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.figures: dict[str, float] = {}

    def _write_token(self, node: str) -> Path:
        folder = self.work / node
        (folder / "home").mkdir(parents=True, exist_ok=True)
        path = folder / "auth_token"
        path.write_text(self.token)
        path.chmod(0o600)
        return path

    def driver_env(self, **extra: str) -> dict[str, str]:
        """Environment of a client in A: RAY_ADDRESS, the token variables, AWS_* for the S3 server."""
        env = netns.base_env(self.venv, str(self.work / "a" / "home"))
        env.update(self.aws_env, RAY_ADDRESS=self.head_address, RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(self.token_path_a), RAY_USAGE_STATS_ENABLED="0")
        env.update(extra)
        return env

    def run_in_a(self, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 180,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run cmd in namespace A (the head's host); env defaults to driver_env()."""
        return subprocess.run(["ip", "netns", "exec", self.net.ns_a, *cmd], env=env or self.driver_env(),
                              cwd=cwd or self.work / "a", capture_output=True, text=True, timeout=timeout)

    def py_in_a(self, body: str, env: dict[str, str] | None = None, timeout: float = 180, **consts) -> object:
        """Run DRIVER_PRELUDE + `NAME = value` for each const + body in a Python driver in A; body sets
        `result` (JSON-able), which is returned. Fails the test with the driver's output otherwise."""
        code = DRIVER_PRELUDE + "".join(f"{k} = {v!r}\n" for k, v in consts.items()) + body
        code += '\nprint("RESULT " + json.dumps(result))\n'
        proc = self.run_in_a([str(self.venv / "bin" / "python"), "-c", code], env=env, timeout=timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            pytest.fail(f"driver in A failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                        f"{proc.stderr[-3000:]}")
        return json.loads(lines[-1][len("RESULT "):])

    def probe_paths(self, paths: list[str]) -> dict[str, dict[str, str]]:
        """{"head"|"worker": {path: "ok" or the exception's name}} of opening each path on each node."""
        return self.py_in_a(PROBE_PATHS, PATHS=paths)

    def _popen(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.work / f"{name}.log", "wb")  # opened on the host: B's writes land here too
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def log_tail(self, name: str, n: int = 3000) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def start_head_and_s3(self) -> None:
        env = netns.base_env(self.venv, str(self.work / "a" / "home"))
        # storage credentials come from each node's own environment (as an instance role would give them):
        # the job's driver and every worker on the node inherit the raylet's
        env.update(self.aws_env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path_a),
                   RAY_USAGE_STATS_ENABLED="0")
        exec_a = ["ip", "netns", "exec", self.net.ns_a]
        self._popen("s3", [*exec_a, str(self.venv / "bin/python"), "-m", "moto.server", "-H", self.ip_a,
                           "-p", str(S3_PORT)], env)
        self._popen("head", [*exec_a, str(self.venv / "bin/ray"), "start", "--head", "--block",
                             f"--node-ip-address={self.ip_a}", f"--dashboard-host={self.ip_a}",
                             f"--port={GCS_PORT}", f"--dashboard-port={DASHBOARD_PORT}",
                             f"--num-cpus={NODE_CPUS}", '--resources={"head": 1}', "--include-dashboard=true",
                             f"--object-store-memory={OBJECT_STORE_BYTES}", f"--temp-dir={self.work}/a/ray",
                             "--disable-usage-stats"], env)
        for name, port in (("head", GCS_PORT), ("s3", S3_PORT)):
            if not netns.wait_tcp(self.net.ns_a, self.ip_a, port, timeout_s=90):
                pytest.fail(f"{name} in A not listening on {self.ip_a}:{port}:\n{self.log_tail(name)}")

    def start_worker(self) -> None:
        """Node B: its own network namespace and a private mount namespace (checkout and /tmp hidden)."""
        node_cmd = " ".join([str(self.venv / "bin/ray"), "start", "--block", f"--address={self.head_address}",
                             f"--node-ip-address={self.ip_b}", f"--num-cpus={NODE_CPUS}",
                             "--resources='{\"worker\": 1}'", f"--object-store-memory={OBJECT_STORE_BYTES}",
                             "--disable-usage-stats"])
        script = netns.hidden_node_script(self.repo, self.venv, self.token_path_b, node_cmd)
        env = netns.base_env(self.venv, "/")
        env.update(self.aws_env, RAY_USAGE_STATS_ENABLED="0")
        self._popen("worker", ["ip", "netns", "exec", self.net.ns_b, "unshare", "--mount", "--propagation",
                               "private", "--fork", "bash", "-c", script], env)

    def worker_pids(self) -> list[int]:
        return netns.ns_pids(self.net.ns_b)

    def kill_worker(self) -> list[int]:
        """Node B dies at once: SIGKILL to every process in its namespace (raylet, workers, agents)."""
        pids = netns.stop_namespace(self.net.ns_b, grace_s=0, first=signal.SIGKILL)
        if "worker" in self.procs:
            self.procs.pop("worker").wait(timeout=30)
        return pids

    def restart_worker(self) -> None:
        """A fresh node B (new tmpfs, new raylet) after kill_worker; returns when two nodes are alive."""
        self.start_worker()
        self.py_in_a(WAIT_NODES_AND_BUCKET, timeout=240, BUCKET=BUCKET)

    def memory_mib(self) -> dict[str, float]:
        """Proportional set size of every process in each namespace, MiB: {"a": ..., "b": ...}."""
        return {"a": netns.pss_mib(netns.ns_pids(self.net.ns_a)),
                "b": netns.pss_mib(netns.ns_pids(self.net.ns_b))}

    def stop(self) -> None:
        """B, then A: each node's `ray start`, then every process left in its namespace (SIGTERM, then
        SIGKILL), by pid; then reap our own children."""
        worker = self.procs.get("worker")
        # the worker's Popen is `unshare --fork`; its child is bash exec'd into `ray start`
        worker_root = (netns.children(worker.pid) or [None])[0] if worker else None
        head_root = self.procs["head"].pid if "head" in self.procs else None
        netns.stop_node(worker_root, self.net.ns_b)
        netns.stop_node(head_root, self.net.ns_a)
        netns.stop_pids([p.pid for p in self.procs.values() if p.poll() is None])
        for p in self.procs.values():
            p.wait(timeout=30)


def pytest_configure(config):
    # Also registered in pyproject.toml's markers; here so that this folder runs without warnings alone.
    config.addinivalue_line("markers", "multinode: tests/multinode: two Ray nodes as two hosts (root, netns)")


def _fail_unless_isolated(cluster: TwoNodes) -> None:
    """The driver writes a file; B must see neither it nor the checkout, A must see both (the control)."""
    marker = cluster.work / "a" / "driver_marker.txt"
    marker.write_text("written by the driver in A")
    paths = [str(marker), str(cluster.repo / "README.md")]
    seen = cluster.probe_paths(paths)
    if set(seen["worker"].values()) != {"FileNotFoundError"} or set(seen["head"].values()) != {"ok"}:
        pytest.fail(f"two_nodes: node isolation broken (worker must not read, head must read): {seen}")


@pytest.fixture(scope="session")
def two_nodes():
    """Yields a running TwoNodes; prints its start/stop seconds and memory (PSS, MiB)."""
    reason = netns.skip_reason()
    if reason:
        pytest.skip(reason)
    netns.remove_stale()
    pid = os.getpid()
    net = netns.net_for(pid)
    work = Path(tempfile.mkdtemp(prefix=f"{netns.PREFIX}-{pid}-"))
    t0 = time.monotonic()
    try:
        netns.make_pair(net)
    except RuntimeError as e:
        netns.remove_pair(net)
        shutil.rmtree(work, ignore_errors=True)
        pytest.skip(f"cannot make network namespaces here: {e}")
    cluster = TwoNodes(net, work)
    try:
        cluster.start_head_and_s3()
        cluster.figures["head_up_s"] = time.monotonic() - t0
        cluster.start_worker()
        try:
            ips = cluster.py_in_a(WAIT_NODES_AND_BUCKET, timeout=240, BUCKET=BUCKET)
        except pytest.fail.Exception as e:
            pytest.fail(f"{e}\nworker log:\n{cluster.log_tail('worker')}\n"
                        f"head log:\n{cluster.log_tail('head')}")
        if ips != sorted([cluster.ip_a, cluster.ip_b]):
            pytest.fail(f"alive nodes {ips}, wanted A and B\nworker log:\n{cluster.log_tail('worker')}")
        cluster.figures["both_alive_s"] = time.monotonic() - t0
        _fail_unless_isolated(cluster)
        cluster.figures["start_s"] = time.monotonic() - t0
        cluster.figures.update({f"pss_{k}_mib": v for k, v in cluster.memory_mib().items()})
        print("\ntwo_nodes: " + ", ".join(f"{k} {v:.1f}" for k, v in cluster.figures.items()))
        yield cluster
    finally:
        t1 = time.monotonic()
        cluster.stop()
        netns.remove_pair(net)
        shutil.rmtree(work, ignore_errors=True)
        print(f"\ntwo_nodes: stopped in {time.monotonic() - t1:.1f} s")

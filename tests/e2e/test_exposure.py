"""Nothing the job starts listens beyond loopback unless configured: the local Ray cluster (GCS, raylet,
workers), its dashboard and job server, the Prometheus metrics endpoint and the weight-sync group's
store and gloo pairs. (Checkpoint loads are checked by tests/unit/test_unsafe_calls.py: safetensors
or torch.load(weights_only=True) only.)

The job's own start-up code (`cluster.train.init_ray` with the dashboard and a metrics port on, and a
broadcast weight group) runs in a child process; every TCP socket that process tree listens on must be
bound to 127.0.0.1 / ::1, never to a wildcard address.
"""

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, socket, sys, threading, time
import psutil
from core.config import load_config
from core.weights import GroupInfo, WeightGroup
from cluster.train import init_ray

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

cfg = load_config(str(sys.argv[1]), ["cluster.dashboard=true", f"cluster.metrics_export_port={free_port()}",
                                     "cluster.num_cpus=2"])
ray = init_ray(cfg)

@ray.remote
def ping():
    return os.getpid()

ray.get([ping.remote() for _ in range(2)])  # workers up
info = GroupInfo("exposure", "127.0.0.1", free_port(), 2)
groups = {}
threads = [threading.Thread(target=lambda r=r: groups.setdefault(r, WeightGroup(info, r))) for r in (0, 1)]
[t.start() for t in threads]
[t.join() for t in threads]
deadline = time.time() + 60
while time.time() < deadline:  # the dashboard and its agents come up a little after init returns
    tree = [psutil.Process()] + psutil.Process().children(recursive=True)
    names = " ".join(p.name() for p in tree)
    if "raylet" in names and "gcs_server" in names and len(tree) > 5:
        break
    time.sleep(1)
time.sleep(5)
pids = {p.pid: p.name() for p in [psutil.Process()] + psutil.Process().children(recursive=True)}
listening = [(c.laddr.ip, c.laddr.port, pids[c.pid]) for c in psutil.net_connections(kind="tcp")
             if c.status == psutil.CONN_LISTEN and c.pid in pids]
print("LISTENING " + json.dumps({"sockets": listening, "dashboard": cfg.cluster.dashboard_host,
                                 "weight_port": info.port}))
ray.shutdown()
"""


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_every_listening_socket_is_loopback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO / "configs/default.yaml")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LISTENING "))
    found = json.loads(line.removeprefix("LISTENING "))
    sockets = found["sockets"]
    names = {name for _, _, name in sockets}
    # the pieces that matter are all there: GCS, raylet, the dashboard (job server) and the weight store
    assert {"gcs_server", "raylet"} <= names, sockets
    ports = {port for _, port, _ in sockets}
    assert 8265 in ports and found["weight_port"] in ports, sockets
    exposed = [s for s in sockets if not _loopback(s[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert found["dashboard"] == "127.0.0.1"  # the default; cluster.dashboard_host changes it on purpose


def test_loopback_check_catches_a_wildcard_bind():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        assert not _loopback(s.getsockname()[0])
    assert _loopback("::ffff:127.0.0.1") and _loopback("::1") and _loopback("127.0.0.1")

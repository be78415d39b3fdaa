"""Two hosts on one machine, for tests/multinode: network namespaces joined by a veth pair, and the
bash that puts the worker node in a private mount namespace with the checkout and /tmp hidden.

Plain helpers (no pytest, no ray). They need root. Everything started here is stopped by pid: a
namespace's processes are listed by `ip netns pids` (never `ray stop`, never a kill by name: other
Ray clusters run on the same machine).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "saeimn"  # namespaces saeimn-<pid>-a/-b, work folders /tmp/saeimn-<pid>-*: <pid> is the owner
_NS_RE = re.compile(rf"^{PREFIX}-(\d+)-[ab]$")
PATH_TAIL = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Net:
    """The two namespaces of one fixture, named and addressed after the pid that owns them."""

    ns_a: str  # head's network namespace
    ns_b: str  # worker's network namespace
    veth_a: str  # the veth end in ns_a (interface names: at most 15 characters)
    veth_b: str
    ip_a: str  # 10.x.y.1 (a /24 derived from the pid)
    ip_b: str  # 10.x.y.2


def net_for(pid: int) -> Net:
    subnet = f"10.{pid % 200 + 20}.{(pid // 200) % 250}"
    return Net(f"{PREFIX}-{pid}-a", f"{PREFIX}-{pid}-b", f"mnva{pid}", f"mnvb{pid}",
               f"{subnet}.1", f"{subnet}.2")


def sh(*args: str, timeout: float = 30) -> str:
    """Run a command, return its stdout; raise with its stderr when it fails."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def skip_reason() -> str | None:
    """Why these tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "two-node tests need root (network and mount namespaces)"
    for tool in ("ip", "unshare", "bash", "mount"):
        if shutil.which(tool) is None:
            return f"two-node tests need `{tool}` on PATH"
    try:
        sh("ip", "netns", "list")
    except (RuntimeError, OSError) as e:
        return f"`ip netns` is unavailable: {e}"
    return None


def make_pair(net: Net) -> None:
    """Both namespaces, the veth pair between them, an address on each end, lo up in each."""
    sh("ip", "netns", "add", net.ns_a)
    sh("ip", "netns", "add", net.ns_b)
    sh("ip", "link", "add", net.veth_a, "type", "veth", "peer", "name", net.veth_b)
    for ns, dev, ip in ((net.ns_a, net.veth_a, net.ip_a), (net.ns_b, net.veth_b, net.ip_b)):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # As on a real host: without a default route Ray's raylet logs that it cannot find its address
        # through 8.8.8.8 and falls back to hostname resolution. Nothing leaves: B has no way out.
        sh("ip", "-n", ns, "route", "add", "default", "dev", dev)


def remove_pair(net: Net) -> None:
    """Deleting a namespace deletes the veth end in it, and with it the peer."""
    for ns in (net.ns_a, net.ns_b):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", net.veth_a], capture_output=True)  # if setup stopped half-way


def ns_pids(ns: str) -> list[int]:
    """Every process whose network namespace is `ns` ([] when the namespace is gone)."""
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(x) for x in proc.stdout.split()] if proc.returncode == 0 else []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie has ended
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_pids(pids: list[int], grace_s: float = 10.0, first: int = signal.SIGTERM) -> None:
    """`first` (SIGTERM), wait up to grace_s, SIGKILL what is left and wait for it to end."""
    _signal_all(pids, first)
    for sig, wait_s in ((signal.SIGKILL, grace_s), (None, 10.0)):
        deadline = time.monotonic() + wait_s
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        if sig is not None:
            _signal_all([p for p in pids if _alive(p)], sig)


def stop_namespace(ns: str, grace_s: float = 10.0, first: int = signal.SIGTERM) -> list[int]:
    """Stop every process in network namespace `ns`; returns their pids. Repeats for processes that
    appeared meanwhile (a raylet that was starting a worker)."""
    stopped: list[int] = []
    for _ in range(3):
        pids = [p for p in ns_pids(ns) if p != os.getpid()]
        if not pids:
            break
        stop_pids(pids, grace_s, first)
        stopped += pids
    return stopped


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def stop_node(root: int | None, ns: str, grace_s: float = 15.0) -> list[int]:
    """SIGTERM to a node's `ray start --block` first: it stops its own processes in order (about 3 s
    here, where a SIGTERM to all of them at once left the GCS running past 15 s); then whatever is
    left in `ns`. Returns the pids stopped in the sweep."""
    if root is not None and _alive(root):
        stop_pids([root], grace_s)
    return stop_namespace(ns)


def pid_alive(pid: int) -> bool:
    return _alive(pid)


def remove_stale(prefix_dir: str = tempfile.gettempdir()) -> list[str]:
    """Namespaces and work folders left by a fixture whose pytest died (its pid is gone)."""
    removed = []
    for line in sh("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NS_RE.match(name)
        if m and not pid_alive(int(m.group(1))):
            stop_namespace(name, grace_s=5)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    for folder in Path(prefix_dir).glob(f"{PREFIX}-*-*"):
        m = re.match(rf"^{PREFIX}-(\d+)-", folder.name)
        if m and folder.is_dir() and not pid_alive(int(m.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


def pss_mib(pids: list[int]) -> float:
    """Proportional set size of these processes, MiB (shared pages split between their users)."""
    total_kb = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total_kb += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration, PermissionError):
            pass
    return total_kb / 1024


def base_env(venv: Path, home: str) -> dict[str, str]:
    """A clean environment for a node or driver: nothing inherited from pytest's process (the root
    conftest may set RAY_* variables for local clusters)."""
    return {"PATH": f"{venv}/bin:{PATH_TAIL}", "HOME": home, "LANG": "C.UTF-8", "VIRTUAL_ENV": str(venv),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def wait_tcp(ns: str, host: str, port: int, timeout_s: float) -> bool:
    """Whether host:port accepts a connection from inside `ns` within timeout_s (bash's /dev/tcp)."""
    tries = max(1, int(timeout_s / 0.25))
    loop = (f"for i in $(seq {tries}); do (exec 3<>/dev/tcp/{host}/{port}) 2>/dev/null && exit 0; "
            "sleep 0.25; done; exit 1")
    proc = subprocess.run(["ip", "netns", "exec", ns, "bash", "-c", loop], capture_output=True,
                          timeout=timeout_s + 30)
    return proc.returncode == 0


def hidden_node_script(repo: Path, venv: Path, token_file: Path, node_cmd: str) -> str:
    """Bash for `unshare --mount --propagation private --fork bash -c ...`: hide the checkout and /tmp
    behind tmpfs, bind the Python environment back, put the node's token in its own /tmp, exec node_cmd.

    The environment is bound onto a tmpfs of this mount namespace's own (/mnt) before the checkout and
    /tmp are hidden, then moved back onto an empty folder of the same path (so it may live in the
    checkout or under /tmp, as in a fresh clone there); the token is read before /tmp goes (a
    provisioned secret on the host) and written to the node's own tmpfs, so nothing of the node's runs
    off the head's disk but the venv.
    """
    return "\n".join([
        "set -euo pipefail",
        f"token=$(cat {token_file})",
        "mount -t tmpfs -o mode=0700 saeimn-side /mnt",
        "mkdir /mnt/venv",
        f"mount --bind {venv} /mnt/venv",
        f"mount -t tmpfs -o mode=0755 saeimn-hide {repo}",
        "mount -t tmpfs -o mode=1777 saeimn-tmp /tmp",
        f"mkdir -p {venv}",
        f"mount --move /mnt/venv {venv}",
        "umask 077",
        "mkdir -p /tmp/node/home",
        'printf %s "$token" > /tmp/node/auth_token',
        "unset token",
        "umask 022",
        "export HOME=/tmp/node/home RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/node/auth_token",
        "cd /tmp/node",
        f"exec {node_cmd}",
    ])

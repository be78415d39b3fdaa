"""Helpers for tests that start their own `ray start --head` cluster: its processes are found by the
GCS port in their command lines (and the raylet's children, the workers), so stopping or killing
touches only that cluster, never another Ray job running on the same machine."""

from __future__ import annotations

import psutil


def cluster_processes(gcs_port: int) -> list[psutil.Process]:
    """Every process of the cluster whose GCS listens on `gcs_port`: GCS, raylet, agents and workers."""
    mark = (f":{gcs_port}", f"_port={gcs_port}", f"--port={gcs_port}")
    own = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(m in cmd for m in mark) and ("ray" in cmd):
            own.append(p)
    found = {p.pid: p for p in own}
    for p in own:
        try:
            for c in p.children(recursive=True):
                found[c.pid] = c
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def kill_all(procs: list[psutil.Process], timeout: float = 30) -> None:
    """SIGKILL `procs` (gone ones are fine) and wait for them."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def stop_cluster(gcs_port: int) -> None:
    """SIGKILL the cluster's processes (what `ray stop --force` does, but for this cluster only)."""
    kill_all(cluster_processes(gcs_port))

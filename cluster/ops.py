"""Talk to a running SaEI job: `python -m cluster.ops status` and `python -m cluster.ops scale --rollout-workers N`.

Each job registers its own `JobController` actor, named after its run folder (`saei-controller-<run>`,
in the config's `cluster.namespace`, `saei` by default), living as long as the job's driver: two jobs
on one cluster, even in one namespace, each have theirs and never touch the other's. The driver reports
every step to it and, between steps, applies a resize someone asked for; this CLI only reads and writes
a controller, so it never blocks the job. `--run NAME` picks the job (its run folder's name, or a prefix
of it that only one running job has); without it the CLI talks to the only job running, and when
several run it lists them and exits 2. It finds the cluster through `--address`, `RAY_ADDRESS`, or the
running local one (`auto`); with no cluster there it prints one `error:` line and exits 2. `scale --wait
S` exits 1 with a line saying what the job reports when it has not reported the new size within S seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

CONTROLLER_PREFIX = "saei-controller-"


def controller_name(run_name: str) -> str:
    """The Ray actor name of the controller of run `run_name` (its run folder's name)."""
    return CONTROLLER_PREFIX + run_name


@ray.remote(num_cpus=0)
class JobController:
    """The job's mailbox: status in (from the driver), resize requests in (from ops), both out."""

    def __init__(self, run_name: str, rollout_workers: int):
        self.status = {"run": run_name, "state": "starting", "step": 0, "rollout_workers": rollout_workers,
                       "ray_job_id": ray.get_runtime_context().get_job_id(),  # the driver that owns it
                       "started": time.time(), "updated": time.time(), "metrics": {}}
        self.wanted: int | None = None

    def report(self, status: dict) -> None:
        self.status.update(status)
        self.status["updated"] = time.time()

    def get_status(self) -> dict:
        return dict(self.status, requested_rollout_workers=self.wanted)

    def request_rollout_workers(self, n: int) -> int:
        if n < 1:
            raise ValueError(f"rollout workers must be >= 1, got {n}")
        self.wanted = n
        return n

    def take_request(self) -> int | None:
        """The pending resize, if any (the driver applies it between steps)."""
        wanted, self.wanted = self.wanted, None
        return wanted


def start_controller(namespace: str, run_name: str, rollout_workers: int):
    """The controller of run `run_name` (`saei-controller-<run_name>` in `namespace`).

    Another job's controller is never touched: one of the same name that belongs to another running
    job (another Ray job id) is an error naming it. One left by an earlier run in this same driver
    (a run started again in one process) is replaced."""
    name = controller_name(run_name)
    try:
        old = ray.get_actor(name, namespace=namespace)
    except ValueError:
        old = None
    if old is not None:
        try:
            owner = ray.get(old.get_status.remote(), timeout=60).get("ray_job_id")
        except ray.exceptions.RayActorError:
            owner = None  # dying with its job: its name is free in a moment
        if owner is not None and owner != ray.get_runtime_context().get_job_id():
            raise RuntimeError(f"another running job (Ray job {owner}) has the controller {name!r} in namespace "
                               f"{namespace!r}: give this run another run.name or cluster.namespace")
        ray.kill(old)
    # on the driver's own node: the job's control plane must not die with a worker node (the driver
    # waits on it every step; if the driver's node dies, the job is gone anyway)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return JobController.options(name=name, namespace=namespace, num_cpus=0,
                                 scheduling_strategy=here).remote(run_name, rollout_workers)


def running_jobs(namespace: str) -> list[str]:
    """Run names of the jobs whose controllers are alive in `namespace`, sorted."""
    return sorted(a["name"][len(CONTROLLER_PREFIX):] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == namespace and a["name"].startswith(CONTROLLER_PREFIX))


class NoJob(RuntimeError):
    """No running job (or none that the CLI can pick without being told which) in the namespace."""


def find_controller(namespace: str, run: str | None):
    """The controller of run `run` (its name, or a prefix only one running job's name has); with
    `run=None`, of the only job running. NoJob says which jobs run when it cannot choose."""
    runs = running_jobs(namespace)
    if not runs:
        raise NoJob(f"no running SaEI job in namespace {namespace!r} (no {CONTROLLER_PREFIX}* actor); "
                    "a job in another namespace needs --namespace (its cluster.namespace)")
    listed = ", ".join(runs)
    if run is None:
        if len(runs) > 1:
            raise NoJob(f"{len(runs)} SaEI jobs run in namespace {namespace!r}: {listed}; name one with --run NAME")
        run = runs[0]
    picked = [r for r in runs if r == run] or [r for r in runs if r.startswith(run)]
    if len(picked) != 1:
        why = "no running job" if not picked else f"{len(picked)} running jobs"
        raise NoJob(f"{why} in namespace {namespace!r} match --run {run!r}; running: {listed}")
    try:
        return ray.get_actor(controller_name(picked[0]), namespace=namespace)
    except ValueError:
        raise NoJob(f"the job {picked[0]!r} has just ended (its controller is gone)") from None


class NoCluster(RuntimeError):
    """No Ray cluster answers at the address the CLI was pointed at."""


def _reachable(address: str, timeout: float = 5.0) -> bool:
    """Whether something listens at a `host:port` address (Ray itself retries a dead one for minutes)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return True  # a ray:// client address or a name Ray resolves itself: let ray.init judge
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _connect(address: str | None, namespace: str, run: str | None):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    if not ray.is_initialized():
        if address != "auto" and not _reachable(address):
            raise NoCluster(f"nothing answers at {address}")
        try:
            ray.init(address=address, namespace=namespace, logging_level="ERROR", log_to_driver=False)
        except ConnectionError as err:
            raise NoCluster(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    return find_controller(namespace, run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else auto)")
    parser.add_argument("--namespace", default="saei", help="the job's cluster.namespace")
    parser.add_argument("--run", default=None,
                        help="the job's run folder name (or a prefix only it has); default: the only job running")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="print the job's state, step, pool size and last metrics (JSON)")
    scale = sub.add_parser("scale", help="resize the rollout pool between steps")
    scale.add_argument("--rollout-workers", type=int, required=True)
    scale.add_argument("--wait", type=float, default=0.0, help="seconds to wait until the job reports the new size")
    args = parser.parse_args(argv)

    try:
        controller = _connect(args.address, args.namespace, args.run)
    except NoJob as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NoCluster as err:
        where = args.address or os.environ.get("RAY_ADDRESS") or "auto (the running local cluster)"
        print(f"error: no Ray cluster at {where} ({err}); point the CLI at the job's cluster with "
              "--address HOST:PORT or RAY_ADDRESS=HOST:PORT (the head's GCS address, `ray status` shows it)",
              file=sys.stderr)
        return 2
    try:
        return _command(args, controller)
    except ray.exceptions.RayActorError:
        print("error: the job's controller is gone (the job has finished or died)", file=sys.stderr)
        return 1


def _command(args, controller) -> int:
    if args.command == "status":
        print(json.dumps(ray.get(controller.get_status.remote()), indent=2, default=str))
        return 0
    if args.rollout_workers < 1:
        print("error: --rollout-workers must be >= 1", file=sys.stderr)
        return 2
    ray.get(controller.request_rollout_workers.remote(args.rollout_workers))
    print(f"requested {args.rollout_workers} rollout workers (applied before the next step)")
    if args.wait <= 0:
        return 0
    deadline = time.time() + args.wait
    while True:
        status = ray.get(controller.get_status.remote())
        if status.get("rollout_workers") == args.rollout_workers and status.get("requested_rollout_workers") is None:
            print(f"rollout pool is now {args.rollout_workers} workers (step {status.get('step')})")
            return 0
        if time.time() >= deadline:
            break
        time.sleep(0.5)
    pending = status.get("requested_rollout_workers")
    print(f"error: waited {args.wait:g} s for the job to report {args.rollout_workers} rollout workers; it reports "
          f"{status.get('rollout_workers')} (state {status.get('state')}, step {status.get('step')}, request "
          f"{'pending: the job has reached no step boundary since' if pending is not None else 'taken, being applied'});"
          " the job applies it at its next step boundary, `python -m cluster.ops status` follows it", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

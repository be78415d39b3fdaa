"""Talk to a running SaEI job: `python -m cluster.ops status` and `python -m cluster.ops scale --rollout-workers N`.

The job registers a named, detached-for-its-lifetime `JobController` actor (name `controller`, in
the config's `cluster.namespace`, `saei` by default). The driver reports every step to it and, between
steps, applies a resize someone asked for; this CLI only reads and writes the controller, so it
never blocks the job. It finds the cluster through `--address`, `RAY_ADDRESS`, or the running local
one (`auto`); with no cluster there it prints one `error:` line and exits 2. `scale --wait S` exits 1
with a line saying what the job reports when it has not reported the new size within S seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import ray

CONTROLLER = "controller"


@ray.remote(num_cpus=0)
class JobController:
    """The job's mailbox: status in (from the driver), resize requests in (from ops), both out."""

    def __init__(self, run_name: str, rollout_workers: int):
        self.status = {"run": run_name, "state": "starting", "step": 0, "rollout_workers": rollout_workers,
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
    """The job's controller; an old one under the same name (a previous job's) is replaced."""
    try:
        ray.kill(ray.get_actor(CONTROLLER, namespace=namespace))
    except ValueError:
        pass
    return JobController.options(name=CONTROLLER, namespace=namespace).remote(run_name, rollout_workers)


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


def _connect(address: str | None, namespace: str):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    if not ray.is_initialized():
        if address != "auto" and not _reachable(address):
            raise NoCluster(f"nothing answers at {address}")
        try:
            ray.init(address=address, namespace=namespace, logging_level="ERROR", log_to_driver=False)
        except ConnectionError as err:
            raise NoCluster(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    try:
        return ray.get_actor(CONTROLLER, namespace=namespace)
    except ValueError:
        raise SystemExit(f"no running SaEI job in namespace {namespace!r} (no {CONTROLLER!r} actor)") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else auto)")
    parser.add_argument("--namespace", default="saei", help="the job's cluster.namespace")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="print the job's state, step, pool size and last metrics (JSON)")
    scale = sub.add_parser("scale", help="resize the rollout pool between steps")
    scale.add_argument("--rollout-workers", type=int, required=True)
    scale.add_argument("--wait", type=float, default=0.0, help="seconds to wait until the job reports the new size")
    args = parser.parse_args(argv)

    try:
        controller = _connect(args.address, args.namespace)
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

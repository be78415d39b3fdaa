"""The learner group: N `LearnerWorker` ranks as Ray actors in one placement group, or one in-process.

The driver calls typed methods (`update`, `export_weights`, `save`, `load`); each fans out to every
rank, because each is a collective, and returns rank 0's answer (all ranks reduce their metrics).
`learner.num_workers = 0` runs a single worker in the calling process: the same code path without
Ray, for tests and for debugging with breakpoints.
"""

from __future__ import annotations

import os
import time

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.batch import TrainBatch
from core.config import Config
from core.devices import free_port, role_device
from core.node_cache import PolicyFolder, node_local
from core.resources import PlacementTimeout, bundle, unplaced_message
from core.weights import GroupInfo
from learner.checkpoint import check_storage_visible
from learner.worker import LearnerWorker, learner_threads


@ray.remote
class LearnerActor:
    """Ray shell of one rank: `setup` builds the `LearnerWorker`, the rest forwards to it."""

    def address(self) -> tuple[str, int]:
        """This node's address and a free port on it (rank 0's are the rendezvous point)."""
        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def pid(self) -> int:
        """This rank's process id (for ops and for the tests that kill a rank)."""
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def setup(self, model_path: str | PolicyFolder, cfg: Config, rank: int, world_size: int, master_addr: str,
              master_port: int, ranks_here: int | None = None) -> bool:
        """Build this rank's worker: the policy from this node's cache, its gloo device on this node's
        address, its threads from this node's cores shared by the `ranks_here` ranks on it."""
        host = ray.util.get_node_ip_address()
        threads = learner_threads(cfg, ranks_here)
        if "OMP_NUM_THREADS" not in ((ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}):
            os.environ["OMP_NUM_THREADS"] = str(threads)  # unless the job's env set it; torch's: set below
        self.worker = LearnerWorker(node_local(model_path, get=ray.get, where=host), cfg, rank=rank,
                                    world_size=world_size, master_addr=master_addr, master_port=master_port,
                                    device=role_device(cfg.cluster.learner_gpus), own_host=host, threads=threads)
        return True

    def update(self, batch: TrainBatch) -> dict[str, float]:
        return self.worker.update(batch)

    @ray.method(num_returns=2)
    def export_weights(self) -> tuple[dict[str, torch.Tensor], bool]:
        """(the weights, True): the small second value says "done" without fetching the first."""
        return self.worker.export_weights(), True

    def broadcast_weights(self, info: GroupInfo, version: int, bucket_bytes: int) -> float:
        return self.worker.broadcast_weights(info, version, bucket_bytes)

    def weights_fingerprint(self) -> str | None:
        return self.worker.weights_fingerprint()

    def save(self, path: str, client_state: dict | None) -> None:
        self.worker.save(path, client_state)

    def check_storage(self, uri: str, token: str) -> None:
        check_storage_visible(uri, token)

    def load(self, path: str) -> dict:
        return self.worker.load(path)

    def close(self) -> None:
        self.worker.close()


class LearnerRankDied(RuntimeError):
    """A learner rank's process is gone: the FSDP group cannot go on without it (its shard of the
    weights and optimizer state went with it), so the job stops and resumes from a checkpoint."""

    def __init__(self, rank: int, call: str, cause: Exception, node: str = "?"):
        self.rank, self.call, self.node = rank, call, node
        super().__init__(f"learner rank {rank} on node {node} died during {call} ({type(cause).__name__})")


# How long a rank's error waits for Ray to report a peer's death that may have caused it.
_DEATH_GRACE_S = 10.0


def _all_ranks(refs: list, call: str, timeout: float | None = None, nodes: list[str] | None = None) -> list:
    """Every rank's result; the first rank that died is named at once, with its node's address from
    `nodes` (the others would wait for it in a collective until the group's timeout,
    learner.worker.GROUP_TIMEOUT)."""
    where = nodes or ["?"] * len(refs)
    pending = dict(zip(refs, range(len(refs))))
    results: list = [None] * len(refs)
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
        if not ready:
            raise ray.exceptions.GetTimeoutError(f"learner {call}: no answer within {timeout} s")
        for ref in ready:
            rank = pending.pop(ref)
            try:
                results[rank] = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                raise LearnerRankDied(rank, call, err, where[rank]) from err
            except ray.exceptions.RayError:
                _raise_if_a_rank_died(pending, call, where)
                raise
    return results


def _raise_if_a_rank_died(pending: dict, call: str, where: list[str]) -> None:
    """Raise LearnerRankDied if one of the `pending` ranks ({ref: rank}) turns out dead within the grace.

    A rank's error is often the echo of a peer's death (gloo: "Connection closed by peer") and can arrive
    before Ray reports that death; the dead rank is the one to name, not the survivor that noticed it.
    """
    deadline = time.monotonic() + _DEATH_GRACE_S
    while pending and (left := deadline - time.monotonic()) > 0:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
        for ref in ready:
            rank = pending.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as err:
                raise LearnerRankDied(rank, call, err, where[rank]) from err
            except ray.exceptions.RayError:
                pass


class LearnerGroup:
    """`learner.num_workers` ranks (0: one in-process worker). Blocking, typed calls."""

    def __init__(self, model_path: str | PolicyFolder, cfg: Config):
        self.cfg = cfg
        n = cfg.learner.num_workers
        self.local: LearnerWorker | None = None
        self.actors: list = []
        self.nodes: list[str] = []  # each rank's node address (named when a rank dies)
        self.pg = None
        if n == 0:
            local = node_local(model_path, get=ray.get if ray.is_initialized() else None)
            self.local = LearnerWorker(local, cfg, device=role_device(cfg.cluster.learner_gpus))
            return
        # PACK keeps ranks on as few nodes as possible: NCCL within a node is the fast path. Each bundle
        # carries the rank's custom resources and accelerator type (cluster.learner_*): the ranks land
        # only on the kind of node the config names.
        self.pg = placement_group([bundle(cfg.cluster, "learner") for _ in range(n)], strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=cfg.cluster.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise PlacementTimeout(unplaced_message("learner rank", n, n, cfg.cluster, "learner",
                                                    ray.available_resources())) from None
        self.actors = [
            LearnerActor.options(
                num_cpus=cfg.cluster.learner_cpus, num_gpus=cfg.cluster.learner_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote()
            for i in range(n)
        ]
        addr, port = ray.get(self.actors[0].address.remote())
        nodes = ray.get([a.node_id.remote() for a in self.actors])  # threads: each node's cores, its ranks'
        ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        self.nodes = [ips.get(node, node) for node in nodes]
        ray.get([a.setup.remote(model_path, cfg, i, n, addr, port, nodes.count(nodes[i]))
                 for i, a in enumerate(self.actors)])

    @property
    def num_workers(self) -> int:
        return len(self.actors) or 1

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One GRPO step on every rank; the metrics are already reduced over ranks."""
        if self.local is not None:
            return self.local.update(batch)
        ref = ray.put(batch)  # one copy in the object store, every rank reads it
        return _all_ranks([a.update.remote(ref) for a in self.actors], "update", nodes=self.nodes)[0]

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The full state dict (Hugging Face names) for the rollout actors and the adversary."""
        return ray.get(self.export_weights_ref()) if self.local is None else self.local.export_weights()

    def export_weights_ref(self) -> ray.ObjectRef:
        """The weights as an object-store reference, to hand to many actors without a driver copy."""
        if self.local is not None:
            return ray.put(self.local.export_weights())
        refs = [a.export_weights.remote() for a in self.actors]  # (weights, done) of each rank; {} but on rank 0
        # every rank, rank 0 included, must be done: a rank that died is named now, not by whoever
        # later reads the reference (a rollout actor, the adversary), nor by a hang in the gather
        _all_ranks([done for _, done in refs], "export_weights", nodes=self.nodes)
        return refs[0][0]

    def weights_fingerprint(self) -> str | None:
        """Fingerprint (core.weights) of the weights rank 0 last exported or broadcast."""
        if self.local is not None:
            return self.local.weights_fingerprint()
        return ray.get(self.actors[0].weights_fingerprint.remote())

    def weights_endpoint(self) -> tuple[str, int]:
        """Address of rank 0's node and a free port on it: where a weight group's store lives."""
        if self.local is not None:
            ip = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
            return ip, free_port(ip)
        return ray.get(self.actors[0].address.remote())

    def broadcast_weights(self, info: GroupInfo, version: int, bucket_bytes: int, timeout: float | None = None) -> float:
        """Send the weights as `version` to the weight group `info` (rank 0 is its sender; see
        LearnerWorker.broadcast_weights). The receivers must be called first: this blocks until every
        one of them has loaded, or raises. Returns the bytes sent."""
        if self.local is not None:
            return self.local.broadcast_weights(info, version, bucket_bytes)
        return _all_ranks([a.broadcast_weights.remote(info, version, bucket_bytes) for a in self.actors],
                          "broadcast_weights", timeout, nodes=self.nodes)[0]

    def check_storage(self, uri: str, token: str) -> None:
        """Every rank reads the marker the driver wrote in the run folder `uri` (core.storage): a folder only
        the driver's node sees fails now, naming the fix, not at the first checkpoint."""
        if self.local is not None:
            return check_storage_visible(uri, token)
        _all_ranks([a.check_storage.remote(uri, token) for a in self.actors], "check_storage", nodes=self.nodes)

    def save(self, path: str, client_state: dict | None = None) -> None:
        """Checkpoint every rank to `path` (see LearnerWorker.save)."""
        if self.local is not None:
            return self.local.save(path, client_state)
        _all_ranks([a.save.remote(path, client_state) for a in self.actors], "save", nodes=self.nodes)

    def load(self, path: str) -> dict:
        """Resume every rank from `path`; returns the client state saved with it."""
        if self.local is not None:
            return self.local.load(path)
        return _all_ranks([a.load.remote(path) for a in self.actors], "load", nodes=self.nodes)[0]

    def shutdown(self) -> None:
        """Stop the ranks and free their placement group (the in-process worker keeps its group)."""
        if self.actors:
            try:
                ray.get([a.close.remote() for a in self.actors], timeout=60)
            except Exception:  # a dead rank must not keep the others alive
                pass
            for a in self.actors:
                ray.kill(a)
            self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

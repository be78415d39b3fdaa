"""The weight sync at the end of a step: the learner's new weights to every rollout actor and the adversary.

Two transports (`cluster.weight_sync`):
- `object_store` (the embedded default, and the fallback): learner rank 0 gathers the full state
  dict, `ray.put` once, every rollout actor and the adversary `ray.get` it and load it.
- `broadcast`: one torch.distributed group (core.weights: gloo on CPU, NCCL on GPU) of learner rank
  0, every rollout engine's worker processes and the adversary. The learner streams packed,
  versioned buckets straight from its FSDP2 shards; the receivers load them as they arrive (vLLM:
  its in-place reload in every worker). Sender and receivers agree on a manifest first: a receiver
  whose names, shapes or dtypes differ stops the job with an error naming the tensor, and nothing
  is loaded anywhere.

The group is built on the first sync and again whenever its membership changes: a resized pool, an
actor Ray restarted (it answers `weight_group_id() -> None`), a sync that failed. A sync that fails
(a receiver died mid-broadcast, a collective timed out after `cluster.weight_sync_timeout_s`) falls
back to the object store for that version, so the step's update is not lost and every live member
serves it; the next sync builds a new group. A member restarted between syncs catches up from an
object-store copy made on demand (`RolloutPool.catch_up_ref`) before it serves.
"""

from __future__ import annotations

import logging
import time
import uuid

import ray
import torch

from core.weights import GroupInfo, ManifestMismatch
from learner.group import LearnerRankDied

log = logging.getLogger("cluster.weight_sync")


class WeightSync:
    """Syncs `parts.learner`'s weights into `parts.pool` and `parts.adversary` (cluster.pipeline.Parts)."""

    def __init__(self, parts):
        self.parts = parts
        self.cfg = parts.cfg
        self.mode = parts.cfg.cluster.weight_sync
        self.group: GroupInfo | None = None
        self.members: list[str] = []  # actor ids of the group's receivers, in rank order
        self.ranks: list[int] = []  # weight-group ranks each receiver takes (its engine's processes)
        self.fallbacks = 0  # broadcasts that failed and went through the object store instead
        parts.pool.weights_provider = parts.learner.export_weights_ref

    def sync(self) -> dict[str, float]:
        """Bring every member to version pool.version + 1; returns the sync's metrics."""
        t0 = time.perf_counter()
        version = self.parts.pool.version + 1
        sent = 0.0
        if self.mode == "broadcast":
            try:
                sent = self._broadcast(version)
            except (ManifestMismatch, LearnerRankDied):
                raise
            except Exception as err:  # noqa: BLE001 (a dead receiver, a timeout: the object store takes over)
                self.fallbacks += 1
                self.group = None
                log.warning("weight broadcast of version %d failed (%s: %s); loading it through the object "
                            "store, the next sync builds a new group", version, type(err).__name__, err)
                self._object_store(version)
        else:
            self._object_store(version)
        # what the learner sent: every answer served at this version is checked against it (RolloutPool)
        self.parts.pool.expect(version, self.parts.learner.weights_fingerprint())
        return {"weight_sync/seconds": time.perf_counter() - t0, "weight_sync/bytes": sent,
                "weight_sync/fallbacks": float(self.fallbacks)}

    def _object_store(self, version: int) -> None:
        pool, adversary = self.parts.pool, self.parts.adversary
        weights = self.parts.learner.export_weights_ref()
        adversary_sync = None
        if adversary is not None:  # tagged with the version the pool is about to serve
            adversary_sync = adversary.load_weights.remote(weights, version)
        pool.load_weights(weights)
        if adversary_sync is not None:
            try:
                self.parts.adversary_watch.wait([adversary_sync], [adversary])  # bounded: it may wait for a node
                ray.get(adversary_sync)
            except ray.exceptions.RayActorError:  # restarted: its next attack catches up on the weights
                log.warning("adversary actor died while loading weights; it catches up at its next attack")

    def _receivers(self) -> list:
        pool, adversary = self.parts.pool, self.parts.adversary
        return list(pool.actors) + ([adversary] if adversary is not None else [])

    def _broadcast(self, version: int) -> float:
        receivers = self._receivers()
        ids = [r._actor_id.hex() for r in receivers]
        joined = ray.get([r.weight_group_id.remote() for r in receivers], timeout=60)
        if self.group is None or ids != self.members or any(g != self.group.group_id for g in joined):
            ranks = ray.get([r.weight_ranks.remote() for r in receivers[:len(self.parts.pool.actors)]], timeout=60)
            ranks += [1] * (len(receivers) - len(ranks))  # the adversary: one process
            host, port = self.parts.learner.weights_endpoint()
            backend = "nccl" if self.cfg.cluster.learner_gpus > 0 and torch.cuda.is_available() else "gloo"
            self.group = GroupInfo(group_id=uuid.uuid4().hex[:12], host=host, port=port, world_size=1 + sum(ranks),
                                   backend=backend, timeout_s=self.cfg.cluster.weight_sync_timeout_s)
            self.members, self.ranks = ids, ranks
            log.info("weight group %s: learner rank 0 + %d receiver process(es), %s", self.group.group_id,
                     sum(ranks), backend)
        refs, rank = [], 1
        for r, n in zip(receivers, self.ranks):
            refs.append(r.receive_weights.remote(self.group, rank, version))
            rank += n
        bucket = int(self.cfg.cluster.weight_bucket_mb * 2**20)
        timeout = self.cfg.cluster.weight_sync_timeout_s + 60
        try:
            sent = self.parts.learner.broadcast_weights(self.group, version, bucket, timeout=timeout)
        finally:
            errors = []
            for ref in refs:  # every receiver's own error: a ManifestMismatch names the tensor
                try:
                    ray.get(ref, timeout=timeout)
                except Exception as err:  # noqa: BLE001
                    errors.append(err)
            mismatch = next((e for e in errors if isinstance(e, ManifestMismatch)), None)
            if mismatch is not None:
                raise mismatch
            if errors:
                raise errors[0]
        self.parts.pool.announce(version)
        return sent

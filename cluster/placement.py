"""Where each role runs, and the GPU placement rules checked before the job starts an actor.

Each role asks Ray for its own resources (`cluster.<role>_cpus` / `_gpus` / `_resources` /
`_accelerator_type`, core.resources): the learner ranks as bundles of one PACK placement group (few
nodes: FSDP's collectives stay within a node where they can; learner/group.py), the rollout actors
SPREAD over the nodes that fit (actors/pool.py), the adversary anywhere it fits (adversary/actor.py).
Custom resources and accelerator types are how an ops team pins a role to a kind of node: start those
nodes with `ray start --resources='{"rollout_node": 4}'` and set `cluster.rollout_resources={rollout_node: 1}`.
A role that finds no room within `cluster.placement_timeout_s` (at start, or when Ray restarts an actor
whose node died) stops the job with a PlacementTimeout naming the resources (actors/placement.py).

Ray treats fractional GPUs as shares of one device: a learner rank at 0.9 and an adversary at 0.1 may
land on the same GPU.

That is harmless between processes that share no NCCL group, and fatal inside one: NCCL refuses two
ranks of one communicator on one device. Under `cluster.weight_sync=broadcast` with the learner on GPU,
learner rank 0, every rollout engine's worker processes and the adversary form one NCCL group
(cluster/weight_sync.py); the learner ranks form another (FSDP2). So the job refuses, before Ray
starts anything:
- a fractional or zero GPU request of a broadcast receiver (rollout actors, the adversary): whole GPUs
  cannot share a device with anything, so no two members can meet whatever rank 0 asks for;
- a rollout actor with fewer GPUs than its vLLM engine's worker processes (`rollout.tensor_parallel_size`);
- learner ranks of at most half a GPU each when there are several (two would fit on one device).
Under `object_store` (no NCCL across roles), fractions stay allowed: that is how roles share a GPU.
"""

from __future__ import annotations

from core.config import Config, ConfigError
from core.resources import role_resources


def role_requests(cfg: Config) -> dict[str, list[dict[str, float]]]:
    """Ray resources of every actor the job starts, per role, as the roles ask for them: `learner`
    (one bundle per rank, rank 0 first; none with `learner.num_workers=0`, which runs in the driver),
    `rollout` (one per actor of `cluster.rollout_workers`) and `adversary` (when `rollout.n_adv` > 0); each
    as core.resources.role_resources (CPU, GPU, then custom resources and the accelerator constraint)."""
    c = cfg.cluster
    return {
        "learner": [role_resources(c, "learner") for _ in range(cfg.learner.num_workers)],
        "rollout": [role_resources(c, "rollout") for _ in range(c.rollout_workers)],
        "adversary": [role_resources(c, "adversary") for _ in range(cfg.rollout.n_adv > 0)],
    }


def gpu_demand(cfg: Config) -> float:
    """GPUs the job reserves in all (the learner in the driver with `num_workers=0` reserves none)."""
    return sum(r["GPU"] for reqs in role_requests(cfg).values() for r in reqs)


def nccl_broadcast(cfg: Config) -> bool:
    """Whether the weight broadcast runs over NCCL (cluster/weight_sync.py: broadcast with the learner
    on GPU; this judges the config, not whether the driver sees CUDA)."""
    return cfg.cluster.weight_sync == "broadcast" and cfg.cluster.learner_gpus > 0


def placement_problems(cfg: Config) -> list[str]:
    """Every GPU placement the config allows in which two ranks of one NCCL group could share a GPU."""
    c, problems = cfg.cluster, []
    why = ("is a member of the NCCL weight-broadcast group (cluster.weight_sync=broadcast with "
           f"cluster.learner_gpus={c.learner_gpus:g}), and Ray may put a fractional request on a GPU that "
           "another member holds, which NCCL refuses: ask for whole GPUs (1, 2, ...), or use "
           "cluster.weight_sync=object_store")
    if nccl_broadcast(cfg):
        receivers = [("cluster.rollout_gpus", c.rollout_gpus, "each rollout actor")]
        if cfg.rollout.n_adv > 0:
            receivers.append(("cluster.adversary_gpus", c.adversary_gpus, "the adversary"))
        for key, gpus, who in receivers:
            if gpus <= 0:
                problems.append(f"{key}={gpus:g}: {who} would join an NCCL group from the CPU ({why})")
            elif gpus != int(gpus):
                problems.append(f"{key}={gpus:g}: {who} {why}")
        tp = cfg.rollout.tensor_parallel_size
        if cfg.rollout.engine == "vllm" and c.rollout_gpus >= 1 and c.rollout_gpus < tp:
            problems.append(f"cluster.rollout_gpus={c.rollout_gpus:g} < rollout.tensor_parallel_size={tp}: the "
                            "engine's worker processes, each a rank of the NCCL weight-broadcast group, would share GPUs")
    n = cfg.learner.num_workers
    if n > 1 and 0 < c.learner_gpus <= 0.5:
        problems.append(f"cluster.learner_gpus={c.learner_gpus:g} with learner.num_workers={n}: two learner ranks "
                        "(one NCCL group) could share a GPU, which NCCL refuses; ask for more than half a GPU per rank")
    return problems


def check_placement(cfg: Config) -> None:
    """Raise ConfigError naming the keys when two ranks of one NCCL group could share a GPU."""
    problems = placement_problems(cfg)
    if problems:
        raise ConfigError("invalid GPU placement:\n  " + "\n  ".join(problems))

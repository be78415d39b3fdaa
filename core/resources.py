"""What each role asks Ray for, from `cluster.*`: CPUs, GPUs, custom resources, an accelerator type.

One place for the three roles (learner ranks, rollout actors, the adversary) so that the actor options
Ray gets, the placement-group bundles, the placement checks (cluster/placement.py) and the messages of a
role that finds no room all say the same thing. Pure: no ray import (core/ rule); the callers pass the
results to `.options(...)` / `placement_group(...)`.
"""

from __future__ import annotations

from core.config_schema import ClusterConfig

ROLES = ("learner", "rollout", "adversary")

# Ray's resource for an actor's `accelerator_type` option (ray._common.utils.RESOURCE_CONSTRAINT_PREFIX):
# a node of type T has `accelerator_type:T: 1`; an actor of that type asks for 0.001 of it.
ACCELERATOR_PREFIX = "accelerator_type:"
ACCELERATOR_SHARE = 0.001


class PlacementTimeout(RuntimeError):
    """A role found no room on the cluster within `cluster.placement_timeout_s`; the message is one line
    naming the resources one actor of that role asks for."""


def role_resources(c: ClusterConfig, role: str) -> dict[str, float]:
    """Everything one actor of `role` needs free on one node, as Ray counts it (CPU and GPU first)."""
    out = {"CPU": float(getattr(c, f"{role}_cpus")), "GPU": float(getattr(c, f"{role}_gpus"))}
    out.update({k: float(v) for k, v in getattr(c, f"{role}_resources").items()})
    accel = getattr(c, f"{role}_accelerator_type")
    if accel:
        out[ACCELERATOR_PREFIX + accel] = ACCELERATOR_SHARE
    return out


def actor_options(c: ClusterConfig, role: str) -> dict:
    """Resource options of one actor of `role` for `ActorClass.options(**...)`."""
    opts: dict = {"num_cpus": getattr(c, f"{role}_cpus"), "num_gpus": getattr(c, f"{role}_gpus")}
    custom = {k: float(v) for k, v in getattr(c, f"{role}_resources").items()}
    if custom:
        opts["resources"] = custom
    accel = getattr(c, f"{role}_accelerator_type")
    if accel:
        opts["accelerator_type"] = accel
    return opts


def bundle(c: ClusterConfig, role: str) -> dict[str, float]:
    """One placement-group bundle of `role` (Ray refuses a bundle entry of 0: those are left out)."""
    return {k: v for k, v in role_resources(c, role).items() if v > 0}


def describe(resources: dict[str, float]) -> str:
    """`CPU=1, GPU=0, gone=1`: resources as a message shows them."""
    return ", ".join(f"{k}={v:g}" for k, v in resources.items()) or "nothing"


def unplaced_message(what: str, waiting: int, of: int, c: ClusterConfig, role: str,
                     free: dict[str, float]) -> str:
    """One line: `waiting` of `of` `what`s were not up (placed and started) within the timeout, what each
    needs, what the cluster has free (`free`: Ray's available resources) and which keys to change."""
    need = role_resources(c, role)
    have = {k: float(free.get(k, 0.0)) for k in need}
    return (f"{waiting} of {of} {what}(s) not up within {c.placement_timeout_s:g} s "
            f"(cluster.placement_timeout_s): each needs {describe(need)} on one node, the cluster has "
            f"{describe(have)} free; add a node with that room, or change "
            + ", ".join(f"cluster.{role}_{k}" for k in ("cpus", "gpus", "resources", "accelerator_type")))

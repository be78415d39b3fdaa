"""The adversary as a Ray actor: a thin shell around `adversary.attack.Attacker`.

It loads its own copy of the policy from a local folder (the same one the rollout actors serve) and
takes new weights from the learner through `load_weights`. Like the rollout actors it keeps the
version and fingerprint of the weights it holds (core.members.HeldWeights), and every attack names the
version it needs with a reference to those weights: when Ray restarts the actor (its `__init__` loads
the folder's weights again) the next attack catches up first, so a restart never attacks with a stale
policy. Every result carries the version and fingerprint it was computed with
(`AttackResult.weights_version` / `weights_fingerprint`), for the driver to check against the
learner's (core.members.check_served). Resources (CPU / GPU share) come from
`cluster.adversary_cpus` / `cluster.adversary_gpus` via `create_adversary_actor`.
"""

from __future__ import annotations

import os

import ray
import torch

from adversary.attack import Attacker, AttackResult
from core.batch import Prompt
from core.config import Config
from core.devices import role_device
from core.members import HeldWeights
from core.node_cache import PolicyFolder, node_local
from core.policy import load_policy, load_processor
from core.resources import actor_options
from core.weights import GroupInfo


@ray.remote
class AdversaryActor:
    """Ray shell: every method forwards to the in-process `Attacker`, after catching up on weights."""

    def __init__(self, model_path: str | PolicyFolder, cfg: Config):
        self.host = ray.util.get_node_ip_address()  # this node's: what its weight-group device binds
        model_path = node_local(model_path, get=ray.get, where=self.host)  # the policy on this node
        device = role_device(cfg.cluster.adversary_gpus)
        if device == "cpu":
            torch.set_num_threads(max(1, int(cfg.cluster.adversary_cpus)))  # cores are shared
        policy = load_policy(model_path, dtype=cfg.model.dtype, device=device,
                             attn_implementation=cfg.model.attn_implementation)
        self.attacker = Attacker(policy, load_processor(model_path), cfg.adversary, cfg.data.format_prompt,
                                 seed=cfg.run.seed, shared_prefix=cfg.model.shared_prefix)
        self.held = HeldWeights("adversary")  # version -1: loaded without a version (unknown)

    def _catch_up(self, version: int | None, weights: list[ray.ObjectRef] | None) -> None:
        # the ref comes inside a list so that Ray hands it over unresolved: fetched only when needed
        if self.held.must_load(version, bool(weights)):
            self.load_weights(ray.get(weights[0]), version)

    def _stamp(self, results: list[AttackResult]) -> list[AttackResult]:
        for result in results:
            result.weights_version, result.weights_fingerprint = self.held.version, self.held.fingerprint
            result.metrics["adversary/pid"] = float(os.getpid())  # a new one after each restart: counted by the driver
        return results

    def ready(self) -> bool:
        return True

    def attack(self, prompt: Prompt, responses: list[torch.Tensor], progress: float = 0.0,
               version: int | None = None, weights: list[ray.ObjectRef] | None = None) -> AttackResult:
        self._catch_up(version, weights)
        return self._stamp([self.attacker.attack(prompt, responses, progress=progress)])[0]

    def attack_many(self, items: list[tuple[Prompt, list[torch.Tensor]]], progress: float = 0.0,
                    version: int | None = None, weights: list[ray.ObjectRef] | None = None) -> list[AttackResult]:
        self._catch_up(version, weights)
        return self._stamp(self.attacker.attack_many(items, progress=progress))

    def load_weights(self, named_tensors: dict[str, torch.Tensor], version: int = -1) -> None:
        self.held.load(self.attacker.load_weights, named_tensors, version)

    def receive_weights(self, info: GroupInfo, rank: int, version: int) -> None:
        """Receive `version` from the weight group `info` (cluster.weight_sync=broadcast) as its `rank`."""
        self.held.receive(lambda: self.attacker.receive_weights(info, rank, own_host=self.host), version)

    def weight_group_id(self) -> str | None:
        """The weight group this actor is a member of (None after a restart)."""
        group = getattr(self.attacker, "_wgroup", None)
        return group.info.group_id if group is not None else None

    def weights_version(self) -> int:
        return self.held.version


def create_adversary_actor(model_path: str | PolicyFolder, cfg: Config):
    """Start the adversary actor with the resources the config gives it (cluster.adversary_cpus / _gpus /
    _resources / _accelerator_type)."""
    # an attack is a pure function of (prompt, responses, weights version): Ray may run it again on the
    # restarted actor, which catches up on the weights first
    # anywhere it fits (Ray's default strategy): cluster.adversary_* may pin it to a kind of node
    return AdversaryActor.options(**actor_options(cfg.cluster, "adversary"), max_restarts=cfg.cluster.max_restarts,
                                  max_task_retries=cfg.cluster.max_restarts).remote(model_path, cfg)

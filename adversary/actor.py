"""The adversary as a Ray actor: a thin shell around `adversary.attack.Attacker`.

It loads its own copy of the policy from a local folder (the same one the rollout actors serve) and
takes new weights from the learner through `load_weights`. Like the rollout actors it keeps the
version of the weights it holds, and every attack names the version it needs with a reference to
those weights: when Ray restarts the actor (its `__init__` loads the folder's weights again) the
next attack catches up first, so a restart never attacks with a stale policy. Resources (CPU / GPU
share) come from `cluster.adversary_cpus` / `cluster.adversary_gpus` via `create_adversary_actor`.
"""

from __future__ import annotations

import os

import ray
import torch

from adversary.attack import Attacker, AttackResult
from core.batch import Prompt
from core.config import Config
from core.policy import load_policy, load_processor
from core.weights import GroupInfo, StaleWeights


@ray.remote
class AdversaryActor:
    """Ray shell: every method forwards to the in-process `Attacker`, after catching up on weights."""

    def __init__(self, model_path: str, cfg: Config):
        device = "cuda" if cfg.cluster.adversary_gpus > 0 and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(cfg.cluster.adversary_cpus)))  # cores are shared
        policy = load_policy(model_path, dtype=cfg.model.dtype, device=device,
                             attn_implementation=cfg.model.attn_implementation)
        self.attacker = Attacker(policy, load_processor(model_path), cfg.adversary, cfg.data.format_prompt,
                                 seed=cfg.run.seed, shared_prefix=cfg.model.shared_prefix)
        self.version = 0  # 0: the weights of model_path; -1: loaded without a version (unknown)

    def _catch_up(self, version: int | None, weights: list[ray.ObjectRef] | None) -> None:
        if version is not None and version != self.version:
            if not weights:  # under broadcast no object-store copy exists until someone needs one
                raise StaleWeights(f"adversary holds weights version {self.version}, the attack needs {version}")
            # the ref comes inside a list so that Ray hands it over unresolved: fetched only when needed
            self.load_weights(ray.get(weights[0]), version)

    def ready(self) -> bool:
        return True

    def attack(self, prompt: Prompt, responses: list[torch.Tensor], progress: float = 0.0,
               version: int | None = None, weights: list[ray.ObjectRef] | None = None) -> AttackResult:
        self._catch_up(version, weights)
        result = self.attacker.attack(prompt, responses, progress=progress)
        result.metrics["adversary/pid"] = float(os.getpid())  # a new one after each restart: counted by the driver
        return result

    def attack_many(self, items: list[tuple[Prompt, list[torch.Tensor]]], progress: float = 0.0,
                    version: int | None = None, weights: list[ray.ObjectRef] | None = None) -> list[AttackResult]:
        self._catch_up(version, weights)
        results = self.attacker.attack_many(items, progress=progress)
        for result in results:
            result.metrics["adversary/pid"] = float(os.getpid())
        return results

    def load_weights(self, named_tensors: dict[str, torch.Tensor], version: int = -1) -> None:
        self.attacker.load_weights(named_tensors)
        self.version = version

    def receive_weights(self, info: GroupInfo, rank: int, version: int) -> None:
        """Receive `version` from the weight group `info` (cluster.weight_sync=broadcast) as its `rank`."""
        self.version = -1  # until the whole version is in
        got = self.attacker.receive_weights(info, rank)
        if got != version:
            raise RuntimeError(f"adversary: the weight group sent version {got}, the driver announced {version}")
        self.version = version

    def weight_group_id(self) -> str | None:
        """The weight group this actor is a member of (None after a restart)."""
        group = getattr(self.attacker, "_wgroup", None)
        return group.info.group_id if group is not None else None

    def weights_version(self) -> int:
        return self.version


def create_adversary_actor(model_path: str, cfg: Config):
    """Start the adversary actor with the resources the config gives it."""
    # an attack is a pure function of (prompt, responses, weights version): Ray may run it again on the
    # restarted actor, which catches up on the weights first
    return AdversaryActor.options(num_cpus=cfg.cluster.adversary_cpus, num_gpus=cfg.cluster.adversary_gpus,
                                  max_restarts=cfg.cluster.max_restarts,
                                  max_task_retries=cfg.cluster.max_restarts).remote(model_path, cfg)

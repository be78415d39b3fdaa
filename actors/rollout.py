"""Rollout: one engine plus reward scoring (`Rollout`), and its Ray shell (`RolloutActor`).

`Rollout` is the plain class (engine from actors.engines, chat template, core.rewards). `RolloutActor`
adds the version and fingerprint of the weights it serves (core.members.HeldWeights): every call names
the weights version it needs, so an actor that Ray restarts catches up with the current weights before
it serves. The pool that spreads requests over K of them is `actors.pool.RolloutPool`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from actors.engines import EngineDied, GenerationRequest, make_engine
from core.batch import Prompt, Sample
from core.config import Config, SamplingConfig
from core.devices import role_device
from core.members import HeldWeights
from core.node_cache import PolicyFolder, node_local
from core.policy import chat_prompt, load_processor
from core.rewards import score
from core.weights import GroupInfo

log = logging.getLogger(__name__)


@dataclass
class RolloutRequest:
    """n samples of one prompt, on its clean image or on an adversarial one."""

    prompt: Prompt
    """The prompt (question, answer for the reward, clean image)."""
    n: int
    """Samples wanted."""
    seed: int
    """Sampling seed: the same (seed, prompt, image, weights) gives the same samples on any actor."""
    image: np.ndarray | None = None  # [H, W, 3] uint8, same size as prompt.image
    """The image to condition on (I_adv); None means the prompt's clean image."""
    adversarial: bool = False
    """Marks the samples as adversarial (`Sample.adversarial`)."""


class Rollout:
    """One engine serving the policy, with the chat template and reward scoring around it.

    model_path: the policy folder on this node. host: this node's address (the Ray shell gives Ray's):
    what vLLM's own processes and this engine's weight-group device bind (None: loopback for vLLM,
    the weight group's host for the group, as on one machine)."""

    def __init__(self, model_path: str, cfg: Config, device: str | None = None, host: str | None = None):
        device = device or role_device(cfg.cluster.rollout_gpus)
        if device == "cpu":
            torch.set_num_threads(max(1, int(cfg.cluster.rollout_cpus)))  # the cores are shared
        self.cfg = cfg
        self.host = host
        self.processor = load_processor(model_path)
        self.engine = make_engine(model_path, cfg, device, host=host)

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> tuple[list[list[Sample]], dict]:
        """Samples of every request (n each, in order, rewards scored) and the engine's counts."""
        t0 = time.perf_counter()
        fmt = self.cfg.data.format_prompt
        engine_requests = [
            GenerationRequest(prompt=chat_prompt(self.processor, r.prompt.problem, fmt),
                              image=r.prompt.image if r.image is None else r.image, n=r.n, seed=r.seed)
            for r in requests
        ]
        results = self.engine.generate(engine_requests, sampling)
        out: list[list[Sample]] = []
        generated = 0
        for req, res in zip(requests, results):
            samples = []
            for i, g in enumerate(res):
                s = score(g.text, req.prompt.answer)
                samples.append(Sample(prompt_uid=req.prompt.uid, response_ids=g.response_ids, text=g.text,
                                      finish_reason=g.finish_reason, adversarial=req.adversarial,
                                      logprobs=g.logprobs, reward=s.reward, accuracy=s.accuracy,
                                      format_ok=s.format_ok, index=i))
                generated += int(g.response_ids.numel())
            out.append(samples)
        stats = self.engine.last_stats
        return out, {"prompt_tokens": int(stats.prompt_tokens), "generated_tokens": generated,
                     "seconds": time.perf_counter() - t0}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.engine.load_weights(weights)

    def receive_weights(self, info: GroupInfo, rank: int) -> tuple[int, str | None]:
        """A sync of the weight group `info` from `rank` on: (the version received, its fingerprint)."""
        version = self.engine.receive_weights(info, rank, own_host=self.host)
        return version, self.engine.received_fingerprint

    @property
    def weight_ranks(self) -> int:
        """Ranks this engine takes in a weight group (its worker processes)."""
        return getattr(self.engine, "ranks", 1)


@ray.remote
class RolloutActor:
    """Ray shell of `Rollout`, plus the version and fingerprint of the weights it serves.

    Ray may restart the actor at any time (its `__init__` then loads the folder's weights again), so
    every call names the weights version it needs and carries a reference to them: a restarted
    actor catches up before it serves, whether or not a task of the pool failed. An engine whose own
    processes died (vLLM's engine core: killed, out of memory) cannot serve again: the actor then
    exits, Ray restarts it with a fresh engine, and the pool sends the lost requests again.
    """

    def __init__(self, model_path: str | PolicyFolder, cfg: Config):
        host = ray.util.get_node_ip_address()  # this node's: what its sockets bind
        self.rollout = Rollout(node_local(model_path, get=ray.get, where=host), cfg, host=host)
        self.held = HeldWeights("rollout actor")

    def ready(self) -> bool:
        return True

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig, version: int = 0,
                 weights: list[ray.ObjectRef] | None = None) -> tuple[list[list[Sample]], dict]:
        """Samples and counts; the counts carry `version`, `weights` (fingerprint) and `pid` for the pool."""
        try:
            # the ref comes inside a list so that Ray hands it over unresolved: fetched only when needed
            if self.held.must_load(version, bool(weights)):
                self.load_weights(ray.get(weights[0]), version)
            out, counts = self.rollout.generate(requests, sampling)
            return out, {**counts, "version": self.held.version, "weights": self.held.fingerprint,
                         "pid": os.getpid()}
        except EngineDied as err:
            _exit_for_restart(err)

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        try:
            self.held.load(self.rollout.load_weights, weights, version)
        except EngineDied as err:
            _exit_for_restart(err)

    def receive_weights(self, info: GroupInfo, rank: int, version: int) -> None:
        """Receive `version` from the weight group `info` (cluster.weight_sync=broadcast) from `rank` on."""
        try:
            self.held.receive(lambda: self.rollout.receive_weights(info, rank), version)
        except EngineDied as err:
            _exit_for_restart(err)
        self.group_id = info.group_id

    def weight_group_id(self) -> str | None:
        """The weight group this actor is a member of (None after a restart)."""
        return getattr(self, "group_id", None)

    def weight_ranks(self) -> int:
        return self.rollout.weight_ranks


def _exit_for_restart(err: EngineDied):
    """End this actor's process: Ray counts it as a crash and restarts the actor (max_restarts)."""
    log.error("%s; exiting so that Ray restarts this rollout actor with a fresh engine", err)
    logging.shutdown()
    os._exit(1)

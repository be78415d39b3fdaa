"""One SaEI-GRPO step, streamed: clean samples -> attack -> adversarial samples -> update -> sync.

`saei_step` is the algorithm as one flat function. The attack of prompt p starts as soon as p's clean
samples are back (while other prompts still generate) and p's adversarial requests are queued as
soon as its image is ready, so the adversary's latency hides behind generation. Vanilla GRPO is the
same function with `rollout.n_adv = 0`; `adversary.kind = noise | none` and `adversary.learn_on`
give the baselines. `evaluate` measures greedy accuracy and pass@k on held-out prompts.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from actors.placement import PlacementWatch
from actors.pool import RolloutPool, RolloutRequest, RolloutStats
from cluster.evaluation import score_responses
from cluster.weight_sync import WeightSync
from core.batch import Group, Prompt, TrainBatch
from core.config import Config, SamplingConfig
from core.members import RestartCounter, check_served
from core.weights import StaleWeights
from learner.group import LearnerGroup
from learner.grpo import group_advantages

log = logging.getLogger("cluster.pipeline")


@dataclass
class Parts:
    """The running pieces a step drives."""

    cfg: Config
    """The run's config."""
    pool: RolloutPool
    """Rollout actors serving the old policy."""
    learner: LearnerGroup
    """Learner ranks holding the trainable policy."""
    adversary: object | None
    """AdversaryActor handle (None when n_adv = 0: vanilla GRPO)."""
    weights: WeightSync = field(init=False)
    """The weight sync to the pool and the adversary (cluster.weight_sync)."""
    adversary_restarts: RestartCounter = field(init=False, default_factory=RestartCounter)
    """Processes the adversary actor has answered from: each new one after the first is a restart (Ray
    retries an attack on the restarted actor by itself, so no error reaches the driver)."""
    adversary_watch: PlacementWatch = field(init=False)
    """Bounds the driver's waits on the adversary: one that Ray cannot place (its node died, no other has
    room) stops the step after `cluster.placement_timeout_s` with a message naming its resources."""

    def __post_init__(self) -> None:
        self.weights = WeightSync(self)
        self.adversary_watch = PlacementWatch("adversary", "adversary", self.cfg.cluster)

    def check_placement(self) -> None:
        """Raise PlacementTimeout when a rollout actor or the adversary has waited too long for a node."""
        self.pool.watch.check(self.pool.actors)
        if self.adversary is not None:
            self.adversary_watch.check([self.adversary])


def request_seed(run_seed: int, step: int, index: int, adversarial: bool) -> int:
    """Sampling seed of one request: stable across restarts, distinct per (step, prompt, image)."""
    return zlib.crc32(f"{run_seed}:{step}:{index}:{int(adversarial)}".encode()) & 0x7FFFFFFF


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def saei_step(parts: Parts, prompts: list[Prompt], step: int, progress: float) -> dict[str, float | None]:
    """One training step on `prompts`; returns its metrics (None where a value does not apply)."""
    cfg = parts.cfg
    t_step = time.perf_counter()
    parts.pool.take_stats()
    stream = StepStream(parts, prompts, step, progress)

    # 1. clean samples, streamed back per task of `rollout.stream_chunk` prompts
    stream.generate_clean()
    while stream.pending():
        returned, attacked = stream.wait()
        # 2. attack each prompt's image as soon as its clean samples are back (TsEC -> EgAS)
        stream.attack(returned)
        # 3. n_adv samples on each I_adv as soon as it is ready
        stream.generate_adversarial(attacked)
    t_generated = time.perf_counter()
    rollout = parts.pool.take_stats()

    # 4. rewards (scored in the rollout actors) -> advantages over each prompt's n_clean + n_adv samples
    groups = stream.groups
    advantages = advantages_of(groups, cfg.learner.advantage_scale)

    # 5. the update, conditioned on I_adv (learn_on=adversarial) or on the clean image
    batch = learner_batch(groups, advantages, cfg.adversary.learn_on)
    t0 = time.perf_counter()
    learned = parts.learner.update(batch)
    t_learned = time.perf_counter()

    # 6. the new weights to every rollout actor and the adversary (cluster.weight_sync)
    synced = parts.weights.sync()
    t_synced = time.perf_counter()

    times = {"time/generate_s": t_generated - t_step, "time/learn_s": t_learned - t0,
             "time/sync_s": t_synced - t_learned, "time/step_s": t_synced - t_step}
    return step_metrics(parts, stream, rollout, advantages, learned, synced, times)


class StepStream:
    """The streamed part of one step (stages 1-3): which prompt's clean samples, attack and adversarial
    samples are in flight, and what came back. One attack call per batch of prompts whose clean samples
    returned together; Ray retries an attack on a restarted adversary by itself, and an error that
    still reaches the driver is retried here up to `cluster.max_restarts` times per step."""

    def __init__(self, parts: Parts, prompts: list[Prompt], step: int, progress: float):
        self.parts, self.cfg, self.pool = parts, parts.cfg, parts.pool
        self.prompts, self.step, self.progress = prompts, step, progress
        self.groups = [Group(prompt=p) for p in prompts]
        self.clean: dict[int, int] = {}  # pool ticket -> prompt index
        self.adv: dict[int, int] = {}
        self.attacks: dict[ray.ObjectRef, list[int]] = {}  # attack call -> the prompt indices it attacks
        self.returned: list[int] = []  # prompts whose clean samples are back and not yet handed out
        self.attack_metrics: list[dict[str, float]] = []
        self.adversary_deaths = 0  # errors that reached the driver (Ray's own retries exhausted)
        self.adversary_restarts = 0  # restarts of the adversary actor seen in this step
        self.adversary_checked = 0  # attack answers whose weights fingerprint was checked against the learner's

    def _seed(self, index: int, adversarial: bool) -> int:
        return request_seed(self.cfg.run.seed, self.step, index, adversarial)

    def generate_clean(self) -> None:
        """Queue n_clean samples of every prompt; with n_clean = 0 every prompt counts as returned."""
        n = self.cfg.rollout.n_clean
        if not n:
            self.returned = list(range(len(self.prompts)))
            return
        reqs = [RolloutRequest(p, n, self._seed(i, False)) for i, p in enumerate(self.prompts)]
        self.clean = {t: i for i, t in enumerate(self.pool.submit(reqs, chunk=self.cfg.rollout.stream_chunk))}

    def pending(self) -> bool:
        return bool(self.pool.pending or self.attacks or self.returned)

    def wait(self) -> tuple[list[int], list[tuple[list[int], list]]]:
        """Wait for what comes back next: (prompts whose clean samples returned, [(prompts, attack results)])."""
        finished = [] if self.returned else self._wait_any()
        returned, self.returned = self.returned, []
        done = [(index, results) for index, ref in finished
                if (results := self._attack_results(index, ref)) is not None]
        return returned, done

    def _wait_any(self) -> list[tuple[list[int], ray.ObjectRef]]:
        """Block until a rollout task or an attack finishes; file the samples that came back and return
        the attacks that finished."""
        waiting = self.pool.pending_refs() + list(self.attacks)
        ready = set(ray.wait(waiting, num_returns=1, timeout=self.pool.watch.every)[0]) if waiting else set()
        if waiting and not ready:  # a member that cannot be placed must not hang the step
            self.parts.check_placement()
        for ticket, samples in self.pool.poll(timeout=0):
            if ticket in self.clean:
                i = self.clean.pop(ticket)
                self.groups[i].clean = samples
                self.returned.append(i)
            else:
                self.groups[self.adv.pop(ticket)].adversarial = samples
        return [(self.attacks.pop(ref), ref) for ref in [r for r in self.attacks if r in ready]]

    def attack(self, index: list[int]) -> None:
        """One attack call on the images of `index` (prompts whose clean samples came back together)."""
        if not index or not self.cfg.rollout.n_adv:
            return
        items = [(self.prompts[i], [s.response_ids for s in self.groups[i].clean]) for i in index]
        weights = [self.pool.weights_ref] if self.pool.weights_ref is not None else None
        self.attacks[self.parts.adversary.attack_many.remote(items, self.progress, self.pool.version, weights)] = index

    def _attack_results(self, index: list[int], ref: ray.ObjectRef) -> list | None:
        """The attack's results, or None when it failed and was sent again."""
        try:
            return ray.get(ref)
        except StaleWeights:  # restarted under broadcast: attack again with a copy to catch up from
            log.warning("adversary lacks weights version %d; it catches up from the object store", self.pool.version)
            self.pool.catch_up_ref()
        except ray.exceptions.RayActorError as e:
            # Ray restarts the adversary; the retried attack brings the current weights with it
            self.adversary_deaths += 1
            if self.adversary_deaths > self.cfg.cluster.max_restarts:
                raise RuntimeError(f"the adversary actor died {self.adversary_deaths} times in step {self.step}") from e
            log.warning("adversary actor died during the attack of prompts %s; attacking again",
                        [self.prompts[i].uid for i in index])
        self.attack(index)
        return None

    def generate_adversarial(self, attacked: list[tuple[list[int], list]]) -> None:
        """Queue n_adv samples on each I_adv of the finished attacks."""
        for index, results in attacked:
            for i, result in zip(index, results):
                self.groups[i].adv_image = result.image
                self._seen_adversary(result.metrics.pop("adversary/pid", None))
                # the image was attacked with the weights the learner sent for that version, or the job stops
                self.adversary_checked += check_served("adversary", result.weights_version,
                                                       result.weights_fingerprint, self.pool.fingerprints)
                self.attack_metrics.append(result.metrics)
            reqs = [RolloutRequest(self.prompts[i], self.cfg.rollout.n_adv, self._seed(i, True), image=r.image,
                                   adversarial=True) for i, r in zip(index, results)]
            self.adv.update(zip(self.pool.submit(reqs, chunk=1, merge=True), index))

    def _seen_adversary(self, pid: int | None) -> None:
        self.adversary_restarts += self.parts.adversary_restarts.seen("adversary", pid)


def advantages_of(groups: list[Group], scale: str) -> torch.Tensor:  # [N] float32, samples in group order
    """GRPO advantages: each sample's reward normalized over its prompt's n_clean + n_adv samples."""
    samples = [s for g in groups for s in g.samples]
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g.samples], dtype=torch.int64)
    return group_advantages(rewards, group_ids, scale=scale)


def step_metrics(parts: Parts, stream: StepStream, rollout: RolloutStats, advantages: torch.Tensor, learned: dict,
                 synced: dict, times: dict[str, float]) -> dict[str, float | None]:
    """The step's metrics row (see cluster.metrics for where it goes)."""
    groups, attack_metrics = stream.groups, stream.attack_metrics
    lost, duplicated = _account(groups, parts.cfg.rollout.n_clean, parts.cfg.rollout.n_adv)
    samples = [s for g in groups for s in g.samples]
    clean_s = [s for g in groups for s in g.clean]
    adv_s = [s for g in groups for s in g.adversarial]
    return {
        "reward/mean": _mean([s.reward for s in samples]),
        "reward/clean": _mean([s.reward for s in clean_s]),
        "reward/adversarial": _mean([s.reward for s in adv_s]),
        "accuracy/clean": _mean([s.accuracy for s in clean_s]),
        "accuracy/adversarial": _mean([s.accuracy for s in adv_s]),
        "format/clean": _mean([float(s.format_ok) for s in clean_s]),
        "entropy/clean": learned.get("entropy/clean"),
        "entropy/adversarial": learned.get("entropy/adversarial"),
        **{k: _mean([m[k] for m in attack_metrics if k in m]) for k in ("tsec/before", "tsec/after", "egas/linf")},
        "samples/clean": float(len(clean_s)),
        "samples/adversarial": float(len(adv_s)),
        "adversarial/novel_frac": _novel_fraction(groups),
        "samples/lost": float(lost),
        "samples/duplicated": float(duplicated),
        "response_length/mean": _mean([float(s.response_ids.numel()) for s in samples]),
        "response_length/clipped": _mean([float(s.finish_reason == "length") for s in samples]),
        "advantage/zero_frac": float((advantages == 0).float().mean()),
        "rollout/tokens_per_s": rollout.generated_tokens / max(times["time/generate_s"], 1e-9),
        "rollout/generated_tokens": float(rollout.generated_tokens),
        "rollout/restarts": float(rollout.restarts),
        "rollout/resent": float(rollout.resent),
        "rollout/weights_checked": float(rollout.weights_checked),
        "adversary/restarts": float(stream.adversary_restarts),
        "adversary/weights_checked": float(stream.adversary_checked),
        "rollout/workers": float(parts.pool.size),
        **{k: v for k, v in learned.items() if k.startswith(("actor/", "learner/", "rollout/logprob"))},
        "weight_sync/bytes": synced["weight_sync/bytes"],
        "weight_sync/fallbacks": synced["weight_sync/fallbacks"],
        "time/attack_s": sum(m.get("time/attack_s", 0.0) for m in attack_metrics),
        **times,
    }


def _account(groups: list[Group], n_clean: int, n_adv: int) -> tuple[int, int]:
    """(lost, duplicated) samples against what each group must hold: sample i of its clean request for
    i < n_clean, of its adversarial one for i < n_adv, all answering its prompt. Restarts and retries
    must leave both at 0; the metrics say so every step."""
    lost = duplicated = 0
    for g in groups:
        want = {(False, i) for i in range(n_clean)} | {(True, i) for i in range(n_adv)}
        got = [(s.adversarial, s.index) for s in g.samples if s.prompt_uid == g.prompt.uid]
        lost += len(want - set(got)) + len(g.samples) - len(got)
        duplicated += len(got) - len(set(got)) + len(set(got) - want)
    return lost, duplicated


def _novel_fraction(groups: list[Group]) -> float | None:
    """Share of adversarial responses that no clean response of their prompt matches token for token:
    what the perturbed image changed in what the policy says (None without adversarial samples)."""
    novel = total = 0
    for g in groups:
        clean = {tuple(s.response_ids.tolist()) for s in g.clean}
        for s in g.adversarial:
            total += 1
            novel += tuple(s.response_ids.tolist()) not in clean
    return novel / total if total else None


def learner_batch(groups: list[Group], advantages: torch.Tensor, learn_on: str) -> TrainBatch:
    """The learner's batch: one context per (prompt, image) so each image runs the vision tower once."""
    problems, images, responses, context, adversarial, logprobs = [], [], [], [], [], []
    for g in groups:
        problems.append(g.prompt.problem)
        images.append(g.prompt.image)
        clean_ctx = len(problems) - 1
        adv_ctx = clean_ctx
        if g.adversarial and learn_on == "adversarial" and g.adv_image is not None:
            problems.append(g.prompt.problem)
            images.append(g.adv_image)
            adv_ctx = len(problems) - 1
        for s in g.samples:
            responses.append(s.response_ids)
            context.append(adv_ctx if s.adversarial else clean_ctx)
            adversarial.append(s.adversarial)
            logprobs.append(s.logprobs)
    return TrainBatch(problems=problems, images=images, responses=responses,
                      context=torch.tensor(context, dtype=torch.int64), advantages=advantages,
                      adversarial=torch.tensor(adversarial, dtype=torch.bool),
                      engine_logprobs=logprobs if all(lp is not None for lp in logprobs) else None)


def evaluate(pool: RolloutPool, cfg: Config, prompts: list[Prompt], step: int) -> dict[str, float]:
    """Greedy accuracy and pass@k (k = rollout.eval_k samples at the training temperature), through the
    rollout pool, scored by cluster.evaluation like the bootstrap's evaluation."""
    greedy = SamplingConfig(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=cfg.rollout.sampling.max_new_tokens,
                            stop=list(cfg.rollout.sampling.stop))
    reqs = [RolloutRequest(p, 1, request_seed(cfg.run.seed, -1, i, False)) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    out, _ = pool.generate(reqs, greedy)
    k = cfg.rollout.eval_k
    reqs_k = [RolloutRequest(p, k, request_seed(cfg.run.seed, -2 - step, i, False)) for i, p in enumerate(prompts)]
    out_k, _ = pool.generate(reqs_k, cfg.rollout.sampling)
    scored = score_responses(prompts, [o[0].text for o in out], [[s.text for s in o] for o in out_k])
    return {**scored.metrics(), "time/eval_s": time.perf_counter() - t0}

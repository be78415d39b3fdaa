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

from actors.rollout import RolloutPool, RolloutRequest
from cluster.weight_sync import WeightSync
from core.batch import Group, Prompt, TrainBatch
from core.config import Config, SamplingConfig
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
    adversary_pids: set = field(init=False, default_factory=set)
    """Processes the adversary actor has answered from: each new one after the first is a restart (Ray
    retries an attack on the restarted actor by itself, so no error reaches the driver)."""

    def __post_init__(self) -> None:
        self.weights = WeightSync(self)


def request_seed(run_seed: int, step: int, index: int, adversarial: bool) -> int:
    """Sampling seed of one request: stable across restarts, distinct per (step, prompt, image)."""
    return zlib.crc32(f"{run_seed}:{step}:{index}:{int(adversarial)}".encode()) & 0x7FFFFFFF


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def saei_step(parts: Parts, prompts: list[Prompt], step: int, progress: float) -> dict[str, float | None]:
    """One training step on `prompts`; returns its metrics (None where a value does not apply)."""
    cfg, pool = parts.cfg, parts.pool
    n_clean, n_adv = cfg.rollout.n_clean, cfg.rollout.n_adv
    t_step = time.perf_counter()
    groups = [Group(prompt=p) for p in prompts]
    pool.take_stats()

    # 1. clean samples, streamed back per task of `stream_chunk` prompts
    clean = {t: i for i, t in enumerate(pool.submit(
        [RolloutRequest(p, n_clean, request_seed(cfg.run.seed, step, i, False)) for i, p in enumerate(prompts)],
        chunk=cfg.rollout.stream_chunk))} if n_clean else {}
    adv: dict[int, int] = {}
    attacks: dict[ray.ObjectRef, list[int]] = {}  # one attack call per batch of prompts that came back together
    attack_metrics: list[dict[str, float]] = []

    adversary_deaths = 0  # errors that reached the driver (Ray's own retries exhausted)
    adversary_restarts = 0  # restarts of the adversary actor seen in this step

    def start_attack(index: list[int]) -> None:
        # the prompts of one clean task come back together: one call attacks them in one batch
        items = [(prompts[i], [s.response_ids for s in groups[i].clean]) for i in index]
        weights = [pool.weights_ref] if pool.weights_ref is not None else None
        attacks[parts.adversary.attack_many.remote(items, progress, pool.version, weights)] = index

    if n_adv and not n_clean:  # nothing to wait for: attack (noise / none) right away
        start_attack(list(range(len(prompts))))
    # 2. as each prompt's clean samples arrive, attack its image; 3. sample on I_adv when it is ready
    while pool.pending or attacks:
        waiting = pool.pending_refs() + list(attacks)
        ready = set(ray.wait(waiting, num_returns=1)[0]) if waiting else set()
        arrived = []
        for ticket, samples in pool.poll(timeout=0):
            if ticket in clean:
                i = clean.pop(ticket)
                groups[i].clean = samples
                arrived.append(i)
            else:
                groups[adv.pop(ticket)].adversarial = samples
        if n_adv and arrived:
            start_attack(arrived)
        for ref in [r for r in attacks if r in ready]:
            index = attacks.pop(ref)
            try:
                results = ray.get(ref)
            except StaleWeights:  # restarted under broadcast: attack again with a copy to catch up from
                log.warning("adversary lacks weights version %d; it catches up from the object store", pool.version)
                pool.catch_up_ref()
                start_attack(index)
                continue
            except ray.exceptions.RayActorError as e:
                # Ray restarts the adversary; the retried attack brings the current weights with it
                adversary_deaths += 1
                if adversary_deaths > cfg.cluster.max_restarts:
                    raise RuntimeError(f"the adversary actor died {adversary_deaths} times in step {step}") from e
                log.warning("adversary actor died during the attack of prompts %s; attacking again",
                            [prompts[i].uid for i in index])
                start_attack(index)
                continue
            for i, result in zip(index, results):
                groups[i].adv_image = result.image
                pid = result.metrics.pop("adversary/pid", None)
                if pid is not None and pid not in parts.adversary_pids:
                    adversary_restarts += bool(parts.adversary_pids)
                    parts.adversary_pids.add(pid)
                attack_metrics.append(result.metrics)
            reqs = [RolloutRequest(prompts[i], n_adv, request_seed(cfg.run.seed, step, i, True), image=r.image,
                                   adversarial=True) for i, r in zip(index, results)]
            adv.update(zip(pool.submit(reqs, chunk=1, merge=True), index))
    t_generated = time.perf_counter()
    rollout = pool.take_stats()
    lost, duplicated = _account(groups, n_clean, n_adv)
    novel = _novel_fraction(groups)

    # 4. advantages over each prompt's n_clean + n_adv samples
    samples = [s for g in groups for s in g.samples]
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g.samples], dtype=torch.int64)
    advantages = group_advantages(rewards, group_ids, scale=cfg.learner.advantage_scale)

    # 5. the update, conditioned on I_adv (learn_on=adversarial) or on the clean image
    batch = learner_batch(groups, advantages, cfg.adversary.learn_on)
    t0 = time.perf_counter()
    learned = parts.learner.update(batch)
    t_learned = time.perf_counter()

    # 6. the new weights to every rollout actor and the adversary (cluster.weight_sync)
    synced = parts.weights.sync()
    t_synced = time.perf_counter()

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
        "tsec/before": _mean([m["tsec/before"] for m in attack_metrics if "tsec/before" in m]),
        "tsec/after": _mean([m["tsec/after"] for m in attack_metrics if "tsec/after" in m]),
        "egas/linf": _mean([m["egas/linf"] for m in attack_metrics if "egas/linf" in m]),
        "samples/clean": float(len(clean_s)),
        "samples/adversarial": float(len(adv_s)),
        "adversarial/novel_frac": novel,
        "samples/lost": float(lost),
        "samples/duplicated": float(duplicated),
        "response_length/mean": _mean([float(s.response_ids.numel()) for s in samples]),
        "response_length/clipped": _mean([float(s.finish_reason == "length") for s in samples]),
        "advantage/zero_frac": float((advantages == 0).float().mean()),
        "rollout/tokens_per_s": rollout.generated_tokens / max(t_generated - t_step, 1e-9),
        "rollout/generated_tokens": float(rollout.generated_tokens),
        "rollout/restarts": float(rollout.restarts),
        "rollout/resent": float(rollout.resent),
        "rollout/weights_checked": float(rollout.weights_checked),
        "adversary/restarts": float(adversary_restarts),
        "rollout/workers": float(pool.size),
        **{k: v for k, v in learned.items() if k.startswith(("actor/", "learner/", "rollout/logprob"))},
        "weight_sync/bytes": synced["weight_sync/bytes"],
        "weight_sync/fallbacks": synced["weight_sync/fallbacks"],
        "time/generate_s": t_generated - t_step,
        "time/attack_s": sum(m.get("time/attack_s", 0.0) for m in attack_metrics),
        "time/learn_s": t_learned - t0,
        "time/sync_s": t_synced - t_learned,
        "time/step_s": t_synced - t_step,
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
    """Greedy accuracy and pass@k (k = rollout.eval_k samples at the training temperature)."""
    greedy = SamplingConfig(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=cfg.rollout.sampling.max_new_tokens,
                            stop=list(cfg.rollout.sampling.stop))
    reqs = [RolloutRequest(p, 1, request_seed(cfg.run.seed, -1, i, False)) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    out, _ = pool.generate(reqs, greedy)
    k = cfg.rollout.eval_k
    reqs_k = [RolloutRequest(p, k, request_seed(cfg.run.seed, -2 - step, i, False)) for i, p in enumerate(prompts)]
    out_k, _ = pool.generate(reqs_k, cfg.rollout.sampling)
    return {
        "eval/accuracy": float(np.mean([o[0].accuracy for o in out])) if out else 0.0,
        "eval/pass@k": float(np.mean([max(s.accuracy for s in o) for o in out_k])) if out_k else 0.0,
        "eval/mean@k": float(np.mean([s.accuracy for o in out_k for s in o])) if out_k else 0.0,
        "eval/prompts": float(len(prompts)),
        "time/eval_s": time.perf_counter() - t0,
    }

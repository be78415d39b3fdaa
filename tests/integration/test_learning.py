"""The RL update moves the policy the way the advantages say: one LearnerWorker step (FSDP2, one gloo
rank) raises the log-probability of the positive-advantage responses and lowers the negative ones.

The responses are sampled from the policy itself (so they are the kind of text the update sees in a
job), their rewards are drawn at random and turned into group advantages by the real
`group_advantages`. Three broken variants of the same step must fail the same check: the advantages'
sign flipped, the advantages shuffled against their samples, and no update at all.
"""

import numpy as np
import pytest
import torch

from actors.engines.hf import HFEngine
from core.batch import TrainBatch
from core.config import load_config
from core.policy import chat_prompt, encode_prompt_response, load_policy, load_processor
from learner.grpo import group_advantages
from learner.worker import LearnerWorker

GROUPS, PER_GROUP = 4, 6


@pytest.fixture(scope="module")
def sampled(tiny_policy_dir):
    """GROUPS prompts with PER_GROUP responses each, sampled from the policy at temperature 1."""
    from actors.engines.base import GenerationRequest
    from core import synthetic

    cfg = load_config(None, ["rollout.sampling.max_new_tokens=12"])
    engine = HFEngine(tiny_policy_dir, dtype="float32")
    problems, images = [], []
    for k in range(GROUPS):
        ex = synthetic.make_example(k, split="test", image_size=56)
        problems.append(ex.problem)
        images.append(np.asarray(ex.image))
    prompts = [chat_prompt(engine.processor, p, cfg.data.format_prompt) for p in problems]
    reqs = [GenerationRequest(prompt=t, image=im, n=PER_GROUP, seed=k) for k, (t, im) in enumerate(zip(prompts, images))]
    out = engine.generate(reqs, cfg.rollout.sampling)
    responses = [r.response_ids for group in out for r in group]
    rng = np.random.default_rng(0)
    rewards = torch.tensor(rng.integers(0, 2, GROUPS * PER_GROUP), dtype=torch.float32)
    rewards[::PER_GROUP], rewards[1::PER_GROUP] = 1.0, 0.0  # every group has spread: no zero advantages
    group_ids = torch.arange(GROUPS).repeat_interleave(PER_GROUP)
    return dict(problems=problems, images=images, responses=responses, group_ids=group_ids,
                advantages=group_advantages(rewards, group_ids))


def _seq_logprobs(model_path, state, cfg, batch: TrainBatch) -> torch.Tensor:  # [N] float64
    """Summed response log-probability of each row under `state`, by the plain model's own forward."""
    model, processor = load_policy(model_path, dtype=torch.float32), load_processor(model_path)
    model.load_state_dict(state)
    texts = [chat_prompt(processor, batch.problems[c], cfg.data.format_prompt) for c in batch.context]
    inputs, rmask = encode_prompt_response(processor, texts, [batch.images[c] for c in batch.context],
                                           batch.responses)
    with torch.no_grad():
        logp = model(**inputs).logits.double()[:, :-1].log_softmax(-1)
    tok = logp.gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    return torch.where(rmask[:, 1:], tok, torch.zeros_like(tok)).sum(-1)


def _step(tiny_policy_dir, sampled, advantages: torch.Tensor, skip_step: bool = False) -> tuple[torch.Tensor, TrainBatch]:
    """Δ summed log-prob of every response after one update with `advantages` (skip_step: optimizer off)."""
    cfg = load_config(None, ["learner.lr=1e-3", "learner.micro_batch_size=8", "cluster.learner_cpus=1"])
    batch = TrainBatch(problems=sampled["problems"], images=sampled["images"], responses=sampled["responses"],
                       context=sampled["group_ids"].clone(), advantages=advantages,
                       adversarial=torch.zeros(len(advantages), dtype=torch.bool))
    worker = LearnerWorker(tiny_policy_dir, cfg)
    if skip_step:
        worker.optimizer.step = lambda *a, **k: None
    before = _seq_logprobs(tiny_policy_dir, worker.export_weights(), cfg, batch)
    worker.update(batch)
    after = _seq_logprobs(tiny_policy_dir, worker.export_weights(), cfg, batch)
    worker.close()
    return after - before, batch


def _agreement(delta: torch.Tensor, advantages: torch.Tensor) -> float:
    """Fraction of responses whose log-probability moved the way their advantage says."""
    return float((torch.sign(delta) == torch.sign(advantages.double())).double().mean())


def test_one_update_raises_positive_and_lowers_negative_samples(tiny_policy_dir, sampled):
    adv = sampled["advantages"]
    delta, _ = _step(tiny_policy_dir, sampled, adv)
    assert (adv != 0).all()
    assert _agreement(delta, adv) >= 0.9, (delta, adv)
    assert float(delta[adv > 0].mean()) > 0 > float(delta[adv < 0].mean())


def test_the_check_fails_for_a_flipped_sign_a_shuffle_or_no_update(tiny_policy_dir, sampled):
    adv = sampled["advantages"]
    flipped, _ = _step(tiny_policy_dir, sampled, -adv)
    assert _agreement(flipped, adv) <= 0.1
    # shuffled within each group: still zero-sum per prompt, but no longer each sample's own advantage
    g = torch.Generator().manual_seed(1)
    perm = torch.cat([k * PER_GROUP + torch.randperm(PER_GROUP, generator=g) for k in range(GROUPS)])
    assert (adv[perm] != adv).any()
    shuffled, _ = _step(tiny_policy_dir, sampled, adv[perm])
    assert _agreement(shuffled, adv) < 0.9
    frozen, _ = _step(tiny_policy_dir, sampled, adv, skip_step=True)
    assert _agreement(frozen, adv) == 0.0  # nothing moved

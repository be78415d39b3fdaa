"""LearnerWorker in-process (one gloo rank under FSDP2) against a plain transformers reference."""

import json

import numpy as np
import pytest
import torch

from adversary.attack import Attacker
from core.batch import TrainBatch
from core.config import load_config
from core.policy import chat_prompt, encode_prompt_response, load_policy, load_processor
from learner.grpo import policy_loss
from learner.worker import LearnerWorker, _plan


def _batch(seed: int = 0, n: int = 5, contexts: int = 2) -> TrainBatch:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (56, 56 + 28 * (k % 2), 3), dtype=np.uint8) for k in range(contexts)]
    return TrainBatch(
        problems=[f"<image>How many shapes are red? ({k})" for k in range(contexts)],
        images=images,
        responses=[torch.from_numpy(rng.integers(20, 300, int(rng.integers(2, 9)))) for _ in range(n)],
        context=torch.from_numpy(rng.integers(0, contexts, n)),
        advantages=torch.from_numpy(rng.normal(size=n).astype(np.float32)),
        adversarial=torch.from_numpy(rng.integers(0, 2, n).astype(bool)),
    )


def _cfg(*overrides: str):
    return load_config(None, ["learner.lr=1e-3", "learner.grad_clip=0.5", "learner.micro_batch_size=2",
                              "cluster.learner_cpus=1", *overrides])


def _reference(path, cfg, batches, epochs=1):
    """The same GRPO steps with the plain model: its own forward (image per row), full logits.

    Returns the final parameters and the clipped gradient of every optimizer step.
    """
    lc = cfg.learner
    model = load_policy(path, dtype=torch.float32)
    if lc.freeze_vision_tower:  # as the worker does (the default)
        model.model.visual.requires_grad_(False)
    ref_model = load_policy(path, dtype=torch.float32) if lc.kl_coef > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=lc.lr, betas=tuple(lc.betas), weight_decay=lc.weight_decay)
    processor = load_processor(path)
    grads = []

    def logprobs(m, inputs):
        logits = m(**inputs).logits.float()
        return logits[:, :-1].log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)

    for batch in batches:
        texts = [chat_prompt(processor, batch.problems[c], cfg.data.format_prompt) for c in batch.context]
        images = [batch.images[c] for c in batch.context]
        inputs, rmask = encode_prompt_response(processor, texts, images, batch.responses)
        mask = rmask[:, 1:]
        old = None
        for _ in range(epochs):
            logp = logprobs(model, inputs)
            old = logp.detach() if old is None else old
            ref = None
            if ref_model is not None:
                with torch.no_grad():
                    ref = logprobs(ref_model, inputs)
            loss, _ = policy_loss(logp, old, batch.advantages, mask, clip_low=lc.clip_low, clip_high=lc.clip_high,
                                  aggregation=lc.aggregation, ref_logprobs=ref, kl_coef=lc.kl_coef)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), lc.grad_clip)
            grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
            opt.step()
            opt.zero_grad()
    return model.state_dict(), grads


def _params(worker: LearnerWorker) -> dict[str, torch.Tensor]:
    return worker.export_weights()


def _record_grads(worker: LearnerWorker) -> list[dict[str, torch.Tensor]]:
    """The (clipped) gradient the worker's optimizer sees at each step, as full tensors."""
    grads, step = [], worker.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append({k.removeprefix("policy."): p.grad.full_tensor().clone()
                      for k, p in worker.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    worker.optimizer.step = recording_step
    return grads


def _assert_grads_close(got: dict, want: dict, rel: float) -> None:
    assert set(got) == set(want)
    for k in want:
        err = float((got[k] - want[k]).norm()) / max(float(want[k].norm()), 1e-12)
        assert err < rel, f"{k}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("overrides,epochs,steps", [
    ([], 1, 1),
    (["learner.aggregation=seq-mean-token-mean"], 1, 1),
    (["learner.epochs=2", "learner.clip_low=0.0001", "learner.clip_high=0.0001"], 2, 1),
    (["learner.kl_coef=0.5"], 1, 2),
    (["learner.freeze_vision_tower=false"], 1, 1),  # every weight trains
])
def test_update_equals_plain_model_reference(tiny_policy_dir, overrides, epochs, steps):
    cfg = _cfg(*overrides)
    batches = [_batch(seed=s) for s in range(steps)]
    worker = LearnerWorker(tiny_policy_dir, cfg)
    got_grads = _record_grads(worker)
    for b in batches:
        metrics = worker.update(b)
    want, want_grads = _reference(tiny_policy_dir, cfg, batches, epochs=epochs)
    assert len(got_grads) == len(want_grads) == steps * epochs
    # The gradients are the sharp test (Adam's first step is blind to their scale). Later steps start
    # from parameters that Adam moved by lr * g / (|g| + eps): float noise in tiny gradients shows
    # there, hence the looser bound after the first step.
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        _assert_grads_close(g, w, rel=1e-4 if i == 0 else 2e-2)
    got = _params(worker)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0.05 * cfg.learner.lr, msg=k)
    assert metrics["learner/tokens"] == sum(r.numel() for r in batches[-1].responses)
    if "learner.kl_coef=0.5" in overrides:
        assert metrics["actor/kl_ref"] > 0  # second step: the policy has left the reference
    if epochs == 2:
        assert metrics["actor/clip_frac"] > 0  # the second epoch's ratio moved past the tiny clip


def test_logprobs_and_entropy_equal_the_models_own_forward(tiny_policy_dir):
    cfg = _cfg()
    worker = LearnerWorker(tiny_policy_dir, cfg)
    batch = _batch(seed=3, n=6, contexts=3)
    inputs, order = worker._encode(batch, list(range(len(batch))))
    with torch.no_grad():
        logp, ent = worker.model(**inputs)
    model, processor = load_policy(tiny_policy_dir), load_processor(tiny_policy_dir)
    texts = [chat_prompt(processor, batch.problems[batch.context[i]], cfg.data.format_prompt) for i in order]
    ref_inputs, rmask = encode_prompt_response(processor, texts, [batch.images[batch.context[i]] for i in order],
                                               [batch.responses[i] for i in order])
    with torch.no_grad():
        logits = model(**ref_inputs).logits[:, :-1][rmask[:, 1:]].double()
    targets = ref_inputs["input_ids"][:, 1:][rmask[:, 1:]]
    want_logp = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    want_ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(logp.double(), want_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=0, atol=2e-5)


def test_entropy_metric_splits_clean_and_adversarial(tiny_policy_dir):
    worker = LearnerWorker(tiny_policy_dir, _cfg())
    batch = _batch(seed=4, n=6)
    m = worker.update(batch)
    n_adv = sum(batch.responses[i].numel() for i in range(len(batch)) if batch.adversarial[i])
    n_all = batch.num_tokens
    mixed = (m["entropy/clean"] * (n_all - n_adv) + m["entropy/adversarial"] * n_adv) / n_all
    assert m["entropy/all"] == pytest.approx(mixed, rel=1e-9)
    assert 0 < m["entropy/all"] < np.log(load_policy(tiny_policy_dir).config.text_config.vocab_size) + 1e-3


def test_engine_logprob_diff_is_reported(tiny_policy_dir):
    worker = LearnerWorker(tiny_policy_dir, _cfg("learner.lr=1e-12"))
    batch = _batch(seed=5)
    inputs, order = worker._encode(batch, list(range(len(batch))))
    with torch.no_grad():
        logp, _ = worker.model(**inputs)
    exact, start = {}, 0
    for i in order:  # the learner's own log-probs, as a perfect engine would report them
        n = batch.responses[i].numel()
        exact[i] = logp[start:start + n].clone()
        start += n
    batch.engine_logprobs = [exact[i] for i in range(len(batch))]
    assert worker.update(batch)["rollout/logprob_diff"] < 1e-6
    batch.engine_logprobs = [t - 0.25 for t in batch.engine_logprobs]
    assert worker.update(batch)["rollout/logprob_diff"] == pytest.approx(0.25, abs=1e-4)


def test_save_load_update_is_bitwise_the_same(tiny_policy_dir, tmp_path):
    cfg = _cfg("learner.warmup_steps=3", "learner.loss_mode=clip_cov", "learner.clip_cov_frac=0.2",
               "learner.clip_cov_bounds=[-100,100]")
    b1, b2 = _batch(seed=1), _batch(seed=2)
    a = LearnerWorker(tiny_policy_dir, cfg)
    a.update(b1)
    a.save(str(tmp_path / "ckpt"), {"data_cursor": 17})
    ma = a.update(b2)
    b = LearnerWorker(tiny_policy_dir, cfg)
    assert b.load(str(tmp_path / "ckpt")) == {"data_cursor": 17}
    mb = b.update(b2)
    pa, pb = _params(a), _params(b)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert ma["actor/lr"] == mb["actor/lr"] == pytest.approx(1e-3 * 2 / 3)  # the warm-up resumed too
    state = json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())
    assert state["step"] == 1
    # the Hugging Face folder is a policy of its own: the weights after the first update
    saved = load_policy(tmp_path / "ckpt" / "hf").state_dict()
    c = LearnerWorker(tiny_policy_dir, cfg)
    c.update(b1)
    for k, v in _params(c).items():
        assert torch.equal(saved[k], v), k


def test_load_rejects_a_folder_that_is_not_a_checkpoint(tiny_policy_dir, tmp_path):
    worker = LearnerWorker(tiny_policy_dir, _cfg())
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        worker.load(str(tmp_path))


def test_exported_weights_load_strict_into_policy_and_adversary(tiny_policy_dir):
    cfg = _cfg()
    worker = LearnerWorker(tiny_policy_dir, cfg)
    worker.update(_batch())
    weights = worker.export_weights()
    fresh = load_policy(tiny_policy_dir)
    fresh.load_state_dict(weights, strict=True)
    before = load_policy(tiny_policy_dir).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    attacker = Attacker(load_policy(tiny_policy_dir), load_processor(tiny_policy_dir), cfg.adversary)
    attacker.load_weights(weights)
    for k, v in attacker.policy.state_dict().items():
        assert torch.equal(v, weights[k]), k


@pytest.mark.parametrize("n,world,micro", [(5, 2, 2), (1, 2, 4), (3, 2, 1), (12, 4, 3), (7, 1, 8)])
def test_plan_covers_every_row_once_with_equal_micro_counts(n, world, micro):
    plans = [_plan(n, r, world, micro) for r in range(world)]
    assert len({len(p) for p in plans}) == 1
    rows = sorted(i for p in plans for mb in p for i in mb)
    assert rows == list(range(n))
    assert all(len(mb) <= micro for p in plans for mb in p)


def test_train_batch_rejects_inconsistent_input():
    b = _batch()
    with pytest.raises(ValueError, match="context"):
        TrainBatch(b.problems, b.images, b.responses, torch.tensor([0, 1, 5, 0, 1]), b.advantages)
    with pytest.raises(ValueError, match="advantages"):
        TrainBatch(b.problems, b.images, b.responses, b.context, b.advantages[:3])
    with pytest.raises(ValueError, match="empty response"):
        TrainBatch(b.problems, b.images, [torch.zeros(0, dtype=torch.long)] + b.responses[1:], b.context,
                   b.advantages)


def test_freeze_vision_tower_keeps_the_tower_and_trains_the_rest(tiny_policy_dir):
    worker = LearnerWorker(tiny_policy_dir, _cfg("learner.freeze_vision_tower=true"))
    before = {k: v.clone() for k, v in _params(worker).items()}  # the export may alias the live weights
    worker.update(_batch(seed=4))
    after = _params(worker)
    tower = [k for k in before if k.startswith("model.visual.")]
    rest = [k for k in before if not k.startswith("model.visual.")]
    assert tower and rest
    assert all(torch.equal(before[k], after[k]) for k in tower)
    assert sum(not torch.equal(before[k], after[k]) for k in rest) > len(rest) // 2

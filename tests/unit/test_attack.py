"""The Attacker on a real tiny policy: exact equivalences, then the property the method needs."""

import numpy as np
import pytest
import torch

from adversary.attack import Attacker, _pack, response_entropy
from adversary.pixels import to_float_image
from adversary.tsec import token_entropy
from core import synthetic
from core.batch import Prompt
from core.config import AdversaryConfig, TsecConfig
from core.policy import (
    chat_prompt,
    encode_groups,
    encode_prompt_response,
    encode_prompts,
    load_policy,
    load_processor,
    vision_special_ids,
)

FORMAT = " Put the final answer in \\boxed{}."


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    return load_policy(tiny_policy_dir), load_processor(tiny_policy_dir)


def _prompt(i: int) -> Prompt:
    ex = synthetic.make_example(i, split="test")
    return Prompt(uid=f"t:{i}", problem=ex.problem, answer=ex.answer, image=np.asarray(ex.image))


def _sample(model, processor, prompt: Prompt, n: int, seed: int, max_new: int = 16) -> list[torch.Tensor]:
    inputs = encode_prompts(processor, [chat_prompt(processor, prompt.problem, FORMAT)] * n, [prompt.image] * n)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=True,
                             suppress_tokens=vision_special_ids(model.config))
    pad, eos = processor.tokenizer.pad_token_id, processor.tokenizer.eos_token_id
    responses = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        if eos in row:
            row = row[:row.index(eos) + 1]
        responses.append(torch.tensor([t for t in row if t != pad] or [eos]))
    return responses


def _entropy_and_pixel_grad(model, processor, groups, shared_prefix: bool):
    """(entropy [N] of every response token, response-major; d sum(entropy) / d pixels) through
    core.policy.encode_groups rows of either layout."""
    encoded, rows_per_image = encode_groups(processor, groups, shared_prefix)
    pv = encoded.pop("pixel_values").clone().requires_grad_(True)
    grid = encoded.pop("image_grid_thw")
    ent, mask = response_entropy(model, encoded, pv, grid, rows_per_image, head_chunk=5)
    ent.sum().backward()
    return ent[mask].detach(), pv.grad, encoded


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared_prefix", "row_per_response"])
def test_response_entropy_equals_plain_forward(policy, shared_prefix):
    """Both layouts give each response token the entropy of the model's own forward on its own
    `prompt + response` row (3 prompts, 4 / 1 / 3 responses of different lengths)."""
    model, processor = policy
    groups, texts, images, flat = [], [], [], []
    for k, n in enumerate((4, 1, 3)):
        prompt = _prompt(20 + k)
        responses = _sample(model, processor, prompt, n, seed=k)
        text = chat_prompt(processor, prompt.problem, FORMAT)
        groups.append((text, prompt.image, responses))
        texts += [text] * n
        images += [prompt.image] * n
        flat += responses
    ent, _, encoded = _entropy_and_pixel_grad(model, processor, groups, shared_prefix)
    assert encoded["input_ids"].shape[0] == (3 if shared_prefix else 8)
    plain_inputs, plain_mask = encode_prompt_response(processor, texts, images, flat)
    with torch.no_grad():
        ref = token_entropy(model(**plain_inputs).logits[:, :-1])[plain_mask[:, 1:]]
    torch.testing.assert_close(ent, ref, atol=1e-5, rtol=1e-5)
    assert encoded["targets"].tolist() == torch.cat(flat).tolist()


def test_shared_prefix_gradients_equal_one_row_per_response(policy):
    """The attack's gradient on the pixels is the same whichever layout computes it, and a response
    cannot see another: changing response 0 leaves the entropies of responses 1-2 unchanged."""
    model, processor = policy
    prompt = _prompt(30)
    responses = _sample(model, processor, prompt, 3, seed=3)
    groups = [(chat_prompt(processor, prompt.problem, FORMAT), prompt.image, responses)]
    ent_s, grad_s, _ = _entropy_and_pixel_grad(model, processor, groups, True)
    ent_r, grad_r, _ = _entropy_and_pixel_grad(model, processor, groups, False)
    torch.testing.assert_close(ent_s, ent_r, atol=1e-5, rtol=1e-5)
    assert grad_r.abs().max() > 0
    torch.testing.assert_close(grad_s, grad_r, atol=1e-7, rtol=1e-4)
    changed = [torch.flip(responses[0], [0]) + 1] + responses[1:]
    ent_c, _, _ = _entropy_and_pixel_grad(model, processor, [(groups[0][0], prompt.image, changed)], True)
    n0 = responses[0].numel()
    torch.testing.assert_close(ent_c[n0:], ent_s[n0:], atol=1e-6, rtol=1e-6)


def test_vision_tower_runs_once_per_evaluation(policy):
    model, processor = policy
    calls = []
    handle = model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        for n_prompts, n in ((1, 1), (1, 6), (3, 4)):
            prompts = [_prompt(10 + k) for k in range(n_prompts)]
            items = [(p, _sample(model, processor, p, n, seed=n)) for p in prompts]  # generate runs it too
            canvas, places = _pack([p.image for p in prompts])
            calls.clear()
            objective, history = Attacker(model, processor, AdversaryConfig(), FORMAT).selective_objective(
                items, places)
            objective(to_float_image(canvas))
            assert len(calls) == 1, (n_prompts, n, len(calls))
            assert len(history) == 1 and len(history[0]) == n_prompts
    finally:
        handle.remove()


def test_batched_attack_equals_one_prompt_at_a_time(policy):
    model, processor = policy
    prompts = [_prompt(20 + k) for k in range(3)]
    items = [(p, _sample(model, processor, p, 3 + k, seed=k)) for k, p in enumerate(prompts)]
    attacker = Attacker(model, processor, AdversaryConfig(), FORMAT)
    batched = attacker.attack_many(items)
    assert [r.prompt_uid for r in batched] == [p.uid for p in prompts]
    assert all(r.metrics["egas/batch_prompts"] == 3 for r in batched)
    for (prompt, responses), b in zip(items, batched):
        single = attacker.attack(prompt, responses)
        assert single.metrics["tsec/before"] == pytest.approx(b.metrics["tsec/before"], rel=1e-4)
        # another batch shape rounds differently; a gradient sign may flip only where it is ~0
        assert (single.image == b.image).mean() > 0.99
        assert b.image.shape == prompt.image.shape


def test_chunk_tokens_splits_the_batch(policy):
    model, processor = policy
    items = [(p, _sample(model, processor, p, 2, seed=1)) for p in (_prompt(30), _prompt(31), _prompt(32))]
    one = max(sum(len(r) for r in rs) for _, rs in items)
    results = Attacker(model, processor, AdversaryConfig(chunk_tokens=one), FORMAT).attack_many(items)
    assert [r.metrics["egas/batch_prompts"] for r in results] == [1.0, 1.0, 1.0]
    assert all(r.metrics["tsec/after"] != r.metrics["tsec/before"] for r in results)


def test_attack_raises_selective_entropy_in_most_seeded_trials(policy):
    """The method's premise on a real policy: one signed step of 2/255 raises the selective entropy.

    A single step is a linearisation, so it may fail on a prompt; it must not fail often.
    """
    model, processor = policy
    attacker = Attacker(model, processor, AdversaryConfig(step_size=2 / 255, steps=1), FORMAT)
    raised = 0
    for trial in range(20):
        prompt = _prompt(100 + trial)
        result = attacker.attack(prompt, _sample(model, processor, prompt, 6, seed=trial))
        raised += result.metrics["tsec/after"] > result.metrics["tsec/before"]
    assert raised >= 18, f"raised in {raised}/20 trials"


def test_attack_image_is_exact_uint8_within_eps(policy):
    model, processor = policy
    prompt = _prompt(2)
    responses = _sample(model, processor, prompt, 3, seed=2)
    for step, steps, eps in ((2 / 255, 1, None), (3 / 255, 1, None), (1 / 255, 3, 2 / 255)):
        cfg = AdversaryConfig(step_size=step, steps=steps, eps=eps)
        result = Attacker(model, processor, cfg, FORMAT).attack(prompt, responses)
        adv = result.image
        assert adv.dtype == np.uint8 and adv.shape == prompt.image.shape
        diff = np.abs(adv.astype(int) - prompt.image.astype(int))
        bound = round(255 * (eps if eps is not None else step * steps))
        assert diff.max() <= bound and diff.max() > 0
        assert result.metrics["egas/linf"] == pytest.approx(diff.max() / 255)


@pytest.mark.parametrize("mode", ["all", "random", "top", "bottom"])
def test_selection_modes_run_and_keep_expected_counts(policy, mode):
    model, processor = policy
    prompt = _prompt(3)
    responses = _sample(model, processor, prompt, 4, seed=3)
    cfg = AdversaryConfig(tsec=TsecConfig(mode=mode))
    a = Attacker(model, processor, cfg, FORMAT).attack(prompt, responses)
    b = Attacker(model, processor, cfg, FORMAT).attack(prompt, responses)
    assert np.array_equal(a.image, b.image)  # `random` too: seeded by run seed and prompt
    n_tokens = sum(len(r) for r in responses)
    if mode == "all":
        assert a.metrics["tsec/tokens_kept"] == n_tokens
    else:
        assert 0 < a.metrics["tsec/tokens_kept"] < n_tokens


def test_baselines_none_and_noise(policy):
    model, processor = policy
    prompt = _prompt(4)
    none = Attacker(model, processor, AdversaryConfig(kind="none"), FORMAT).attack(prompt, [])
    assert np.array_equal(none.image, prompt.image)
    noisy = Attacker(model, processor, AdversaryConfig(kind="noise", noise_t_start=400), FORMAT)
    early, late = noisy.attack(prompt, [], progress=0.0), noisy.attack(prompt, [], progress=1.0)
    assert early.metrics["noise/t"] == 400 and late.metrics["noise/t"] == 0
    assert np.abs(early.image.astype(int) - prompt.image.astype(int)).mean() > 1
    assert np.array_equal(noisy.attack(prompt, [], progress=0.0).image, early.image)


def test_load_weights_is_strict_and_takes_effect(policy, tiny_policy_dir):
    model, processor = policy
    attacker = Attacker(load_policy(tiny_policy_dir), processor, AdversaryConfig(), FORMAT)
    prompt = _prompt(5)
    responses = _sample(model, processor, prompt, 2, seed=5)
    before = attacker.attack(prompt, responses).metrics["tsec/before"]
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    attacker.load_weights(state)
    assert attacker.attack(prompt, responses).metrics["tsec/before"] != pytest.approx(before)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        attacker.load_weights({**state, "bogus.weight": torch.zeros(1)})

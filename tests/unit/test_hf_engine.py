"""The transformers engine on the tiny policy: sampling semantics, log-probs, stops, seeds, weights."""

import re
import shutil

import numpy as np
import pytest
import torch

from actors.engines import GenerationRequest, GenerationStats, make_engine, sample_seed
from actors.engines.hf import HFEngine
from core import synthetic
from core.config import SamplingConfig, load_config
from core.policy import (
    chat_prompt,
    encode_prompt_response,
    encode_prompts,
    load_policy,
    vision_special_ids,
)

FORMAT = " Put the final answer in \\boxed{}."


@pytest.fixture(scope="module")
def engine(tiny_policy_dir):
    return HFEngine(tiny_policy_dir)


def _requests(engine, n=2, seed=0, count=3, first=0):
    """Synthetic prompts of different lengths; request 1 gets a non-square image (other image token count)."""
    out = []
    for i in range(first, first + count):
        ex = synthetic.make_example(i)
        image = np.asarray(ex.image)
        if i % 3 == 1:
            image = np.ascontiguousarray(image[:56])  # 56 x 112: 8 image tokens instead of 16
        out.append(GenerationRequest(prompt=chat_prompt(engine.processor, ex.problem, FORMAT), image=image, n=n,
                                     seed=seed + i))
    return out


def _same(a, b, atol=0.0):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for g, h in zip(x, y):
            assert torch.equal(g.response_ids, h.response_ids)
            assert g.text == h.text and g.finish_reason == h.finish_reason
            torch.testing.assert_close(g.logprobs, h.logprobs, atol=atol, rtol=0)


def _teacher_logprobs(engine, requests, responses):
    """log_softmax of a plain forward over prompt + response, gathered at the response tokens."""
    inputs, mask = encode_prompt_response(engine.processor, [r.prompt for r in requests],
                                          [r.image for r in requests], responses)
    with torch.no_grad():
        logits = engine.model(**inputs).logits.float()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    return [logp[i][mask[i, 1:]] for i in range(len(responses))], logits[:, :-1], mask[:, 1:]


class _BiasedHead(torch.nn.Module):
    """The policy's head plus a constant bias [V]: makes chosen tokens overwhelmingly likely."""

    def __init__(self, head, bias):
        super().__init__()
        self.head = head
        self.register_buffer("bias", bias)

    def forward(self, hidden):
        return self.head(hidden) + self.bias


def _biased_engine(tiny_policy_dir, token_ids, value):
    engine = HFEngine(tiny_policy_dir)
    bias = torch.zeros(engine.model.config.text_config.vocab_size)
    bias[token_ids] = value
    engine.model.lm_head = _BiasedHead(engine.model.lm_head, bias)
    return engine


def test_n_samples_per_request_in_order_with_stats(engine):
    requests = _requests(engine, n=2)
    requests[1].n = 0
    requests[2].n = 3
    out = engine.generate(requests, SamplingConfig(max_new_tokens=6))
    assert [len(r) for r in out] == [2, 0, 3]
    for r in out:
        for g in r:
            assert g.response_ids.dtype == torch.int64 and g.response_ids.ndim == 1 and g.response_ids.numel() >= 1
            assert g.logprobs.dtype == torch.float32 and g.logprobs.shape == g.response_ids.shape
            assert (g.logprobs <= 0).all() and isinstance(g.text, str) and g.finish_reason in ("stop", "length")
    stats = engine.last_stats
    assert isinstance(stats, GenerationStats) and stats.requests == 3 and stats.samples == 5
    assert stats.generated_tokens == sum(g.response_ids.numel() for r in out for g in r)
    rows = [(r, enc) for r in requests if r.n
            for enc in [encode_prompts(engine.processor, [r.prompt], [r.image])]]
    assert stats.prompt_tokens == sum(r.n * int(enc["attention_mask"].sum()) for r, enc in rows)
    assert stats.seconds > 0 and stats.tokens_per_s == pytest.approx(stats.generated_tokens / stats.seconds)
    assert engine.generate([], SamplingConfig()) == [] and engine.last_stats.samples == 0


def test_max_new_tokens_gives_length_and_end_of_turn_gives_stop(engine, tiny_policy_dir):
    out = engine.generate(_requests(engine, n=3), SamplingConfig(max_new_tokens=5))
    stop_ids = torch.tensor(engine.stop_ids)
    for g in (g for r in out for g in r):
        assert g.response_ids.numel() <= 5
        if g.finish_reason == "length":
            assert g.response_ids.numel() == 5 and not torch.isin(g.response_ids, stop_ids).any()
    # a head that favours <|im_end|> ends most responses early: the token stays, its text does not
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    eager = _biased_engine(tiny_policy_dir, [im_end], 6.0)
    out = eager.generate(_requests(eager, n=4), SamplingConfig(max_new_tokens=12))
    stopped = [g for r in out for g in r if g.finish_reason == "stop"]
    assert len(stopped) >= 8
    for g in stopped:
        assert g.response_ids[-1] == im_end and not torch.isin(g.response_ids[:-1], stop_ids).any()
        assert "im_end" not in g.text
        assert g.text == eager.tokenizer.decode(g.response_ids, skip_special_tokens=True)
    assert any(g.response_ids.numel() < 12 for g in stopped)


def test_vision_special_tokens_are_never_generated(tiny_policy_dir):
    # the raw model puts almost all its mass on the vision tokens; suppression must still keep them out
    engine = _biased_engine(tiny_policy_dir, vision_special_ids(load_policy(tiny_policy_dir).config), 30.0)
    banned = torch.tensor(vision_special_ids(engine.model.config))
    for sampling in (SamplingConfig(temperature=0, max_new_tokens=8), SamplingConfig(max_new_tokens=8),
                     SamplingConfig(temperature=1.5, top_k=5, top_p=0.99, max_new_tokens=8)):
        out = engine.generate(_requests(engine, n=3), sampling)
        for g in (g for r in out for g in r):
            assert not torch.isin(g.response_ids, banned).any()
            # the log-probs are the raw model's, which wanted a vision token: every drawn token is unlikely
            assert (g.logprobs < -20).all()


def test_stop_strings_cut_text_and_ids(engine):
    requests = _requests(engine, n=3, seed=5)
    free = engine.generate(requests, SamplingConfig(max_new_tokens=32))
    # a plain ASCII piece from the middle of one sample's text
    text = next(g.text for r in free for g in r if re.search(r"[A-Za-z0-9]{3}", g.text[6:]))
    stop = re.search(r"[A-Za-z0-9]{3}", text[6:]).group(0)[:2]
    cut = engine.generate(requests, SamplingConfig(max_new_tokens=32, stop=[stop, "\x00never\x00"]))
    hits = 0
    for r_free, r_cut in zip(free, cut):
        for g, h in zip(r_free, r_cut):
            n = h.response_ids.numel()
            assert torch.equal(h.response_ids, g.response_ids[:n])
            torch.testing.assert_close(h.logprobs, g.logprobs[:n], atol=0, rtol=0)
            if stop not in g.text:
                assert h.text == g.text and h.finish_reason == g.finish_reason
                continue
            hits += 1
            assert h.finish_reason == "stop"
            assert h.text == g.text[:g.text.find(stop) + len(stop)]
            decode = engine.tokenizer.decode
            # the ids are the fewest whose text holds the stop string
            assert decode(h.response_ids, skip_special_tokens=True).startswith(h.text)
            assert stop not in decode(h.response_ids[:-1], skip_special_tokens=True)
    assert hits >= 1


def test_seeds_decide_the_samples(engine):
    sampling = SamplingConfig(max_new_tokens=10)
    a = engine.generate(_requests(engine, n=3, seed=0), sampling)
    _same(a, engine.generate(_requests(engine, n=3, seed=0), sampling))
    b = engine.generate(_requests(engine, n=3, seed=100), sampling)
    for ra, rb in zip(a, b):
        assert all(not torch.equal(g.response_ids, h.response_ids) for g, h in zip(ra, rb))
        # the n samples of one request are different draws
        assert len({tuple(g.response_ids.tolist()) for g in ra}) == 3
    assert len({sample_seed(s, i) for s in range(50) for i in range(50)}) == 2500
    assert 0 <= sample_seed(-1, 0) < 2**63


def test_samples_do_not_depend_on_the_batch(engine, tiny_policy_dir):
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=12)
    requests = _requests(engine, n=2, count=4)
    batched = engine.generate(requests, sampling)
    alone = [engine.generate([r], sampling)[0] for r in requests]
    # left padding moves the logits by float noise: same tokens, log-probs equal to ~1e-5
    _same(batched, alone, atol=1e-4)
    reordered = engine.generate(requests[::-1], sampling)[::-1]
    _same(batched, reordered, atol=1e-4)
    # chunking changes nothing at all when the chunks hold the same rows
    chunked = HFEngine(tiny_policy_dir, max_batch_requests=1).generate(requests, sampling)
    _same(chunked, alone)


def test_logprobs_equal_a_teacher_forced_forward(engine):
    banned = torch.tensor(vision_special_ids(engine.model.config))
    for sampling in (SamplingConfig(max_new_tokens=16), SamplingConfig(temperature=0.7, top_k=40, top_p=0.9,
                                                                       max_new_tokens=16),
                     SamplingConfig(temperature=0, max_new_tokens=16)):
        requests = _requests(engine, n=2, count=2)
        out = engine.generate(requests, sampling)
        rows = [r for r in requests for _ in range(r.n)]
        samples = [g for r in out for g in r]
        teacher, logits, mask = _teacher_logprobs(engine, rows, [g.response_ids for g in samples])
        for g, t in zip(samples, teacher):
            # raw log-probs at temperature 1, whatever the sampling settings
            torch.testing.assert_close(g.logprobs, t, atol=1e-4, rtol=0)
        if sampling.temperature == 0:
            masked = logits.clone()
            masked[..., banned] = -torch.inf
            for i, g in enumerate(samples):
                assert torch.equal(masked[i][mask[i]].argmax(-1), g.response_ids)


def _count_images_encoded(engine) -> tuple[list[int], object]:
    """A forward hook on the vision tower: the images ([K, 3] grid rows) each call of it encodes."""
    seen: list[int] = []
    hook = engine.model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(len(kwargs.get("grid_thw", args[1] if len(args) > 1 else []))),
        with_kwargs=True)
    return seen, hook


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_tower_runs_once_per_prompt_and_changes_no_sample(arch, tiny_policy_dir, tmp_path):
    from core.policy import build_tiny_policy

    path = tiny_policy_dir if arch == "qwen2_vl" else build_tiny_policy(tmp_path / "q25", arch=arch, seed=1)
    shared, per_row = HFEngine(path), HFEngine(path, share_vision=False)
    requests = _requests(shared, n=4, count=3)  # three prompts, one of them with a non-square image
    requests[2].n = 1
    for sampling in (SamplingConfig(temperature=1.0, max_new_tokens=10), SamplingConfig(temperature=0.0,
                                                                                          max_new_tokens=10)):
        seen, hook = _count_images_encoded(shared)
        got = shared.generate(requests, sampling)
        hook.remove()
        seen_rows, hook = _count_images_encoded(per_row)
        want = per_row.generate(requests, sampling)
        hook.remove()
        assert sum(seen) == len(requests)  # one image per prompt through the tower ...
        assert sum(seen_rows) == sum(r.n for r in requests)  # ... where transformers' path runs one per sample
        _same(got, want, atol=1e-5)  # the same tokens and text; log-probs up to float noise
    assert not hasattr(vars(shared.model.model), "get_image_features")  # the wrapper is gone after generate


def test_greedy_equals_transformers_generate(engine):
    requests = _requests(engine, n=1, count=3)
    out = engine.generate(requests, SamplingConfig(temperature=0, max_new_tokens=12))
    for r, (g,) in zip(requests, out):
        inputs = encode_prompts(engine.processor, [r.prompt], [r.image])
        with torch.no_grad():
            ref = engine.model.generate(**inputs, do_sample=False, max_new_tokens=12, eos_token_id=engine.stop_ids,
                                        suppress_tokens=vision_special_ids(engine.model.config))
        ref = ref[0, inputs["input_ids"].shape[1]:]
        assert torch.equal(g.response_ids, ref[:g.response_ids.numel()])


def _perturbed_folder(tiny_policy_dir, dest):
    """The tiny policy with every weight moved a little, as a folder; returns (folder, its state dict)."""
    model = load_policy(tiny_policy_dir)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    shutil.copytree(tiny_policy_dir, dest)
    model.save_pretrained(dest)
    return dest, model.state_dict()


def test_load_weights_matches_a_fresh_engine_on_those_weights(tiny_policy_dir, tmp_path):
    engine = HFEngine(tiny_policy_dir)
    requests = _requests(engine, n=2, count=2)
    greedy, sampled = SamplingConfig(temperature=0, max_new_tokens=10), SamplingConfig(max_new_tokens=10)
    before = engine.generate(requests, greedy)
    folder, state = _perturbed_folder(tiny_policy_dir, tmp_path / "moved")
    engine.load_weights(state)
    after = engine.generate(requests, greedy)
    assert any(not torch.equal(g.response_ids, h.response_ids) for r, s in zip(before, after) for g, h in zip(r, s))
    fresh = HFEngine(folder)
    _same(after, fresh.generate(requests, greedy), atol=1e-5)
    _same(engine.generate(requests, sampled), fresh.generate(requests, sampled), atol=1e-5)


def test_load_weights_rejects_bad_keys_and_changes_nothing(tiny_policy_dir):
    engine = HFEngine(tiny_policy_dir)
    requests = _requests(engine, n=1, count=2)
    greedy = SamplingConfig(temperature=0, max_new_tokens=8)
    before = engine.generate(requests, greedy)
    state = {k: v.clone() + 1.0 for k, v in engine.model.state_dict().items()}
    missing = dict(state)
    del missing["lm_head.weight"]
    with pytest.raises(KeyError, match=r"1 missing key\(s\) \['lm_head.weight'\]"):
        engine.load_weights(missing)
    with pytest.raises(KeyError, match=r"unexpected key\(s\) \['visual.blocks.0.bogus'\]"):
        engine.load_weights(dict(state, **{"visual.blocks.0.bogus": torch.zeros(1)}))
    shaped = dict(state, **{"lm_head.weight": state["lm_head.weight"][:, :-1]})
    with pytest.raises(ValueError, match="lm_head.weight"):
        engine.load_weights(shaped)
    _same(before, engine.generate(requests, greedy))


COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module")
def colour_policy(tiny_policy_dir, tmp_path_factory):
    """The tiny policy taught to name the colour of a plain image (80 steps, ~4 s): it reads the image."""
    from core.policy import load_processor

    model = load_policy(tiny_policy_dir).train()
    processor = load_processor(tiny_policy_dir)
    text = chat_prompt(processor, "What colour is the picture?")
    targets = [processor.tokenizer(f"It is {c}.<|im_end|>", add_special_tokens=False)["input_ids"] for c in COLOURS]
    images = [np.full((56, 56, 3), v, np.uint8) for v in COLOURS.values()]
    inputs, mask = encode_prompt_response(processor, [text] * len(COLOURS), images, targets)
    labels, mask = inputs["input_ids"][:, 1:], mask[:, 1:]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits[:, :-1][mask], labels[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("colour") / "policy"
    shutil.copytree(tiny_policy_dir, folder)
    model.eval().save_pretrained(folder)
    return folder, text


def test_the_image_matters(colour_policy):
    folder, text = colour_policy
    engine = HFEngine(folder)
    requests = [GenerationRequest(text, np.full((56, 56, 3), v, np.uint8), n=4, seed=1) for v in COLOURS.values()]
    greedy = engine.generate(requests, SamplingConfig(temperature=0, max_new_tokens=8))
    for colour, samples in zip(COLOURS, greedy):
        assert [g.text for g in samples] == [f"It is {colour}."] * 4
        assert all(g.finish_reason == "stop" for g in samples)
    # sampled answers name the image's colour more often than any other
    sampled = engine.generate(requests, SamplingConfig(temperature=0.5, max_new_tokens=8))
    for colour, samples in zip(COLOURS, sampled):
        named = [c for g in samples for c in COLOURS if c in g.text]
        assert named.count(colour) > max(named.count(c) for c in COLOURS if c != colour)


def test_make_engine_and_request_checks(tiny_policy_dir):
    cfg = load_config(None, ["rollout.engine=hf", "rollout.max_batch_requests=3", "model.dtype=float32"])
    engine = make_engine(str(tiny_policy_dir), cfg, "cpu")
    assert isinstance(engine, HFEngine) and engine.max_batch_requests == 3
    assert engine.model.dtype == torch.float32
    import actors.engines.vllm as vllm_engine  # importable without vllm installed: vllm loads lazily

    assert hasattr(vllm_engine, "VLLMEngine")
    with pytest.raises(ValueError, match="uint8"):
        GenerationRequest("x", np.zeros((56, 56, 3), np.float32), n=1, seed=0)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([], SamplingConfig(top_p=0.0))
    engine.close()


def test_qwen2_5_vl_policy_same_guarantees(tmp_path):
    from core.policy import build_tiny_policy

    engine = HFEngine(build_tiny_policy(tmp_path / "q25", arch="qwen2_5_vl", seed=1))
    requests = _requests(engine, n=2, count=3)
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=10)
    out = engine.generate(requests, sampling)
    _same(out, [engine.generate([r], sampling)[0] for r in requests], atol=1e-4)
    rows = [r for r in requests for _ in range(r.n)]
    samples = [g for r in out for g in r]
    teacher, _, _ = _teacher_logprobs(engine, rows, [g.response_ids for g in samples])
    for g, t in zip(samples, teacher):
        torch.testing.assert_close(g.logprobs, t, atol=1e-4, rtol=0)

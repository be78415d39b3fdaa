import json

import numpy as np
import pytest
import torch

from core import synthetic
from core.policy import (
    QWEN_SPECIAL_TOKENS,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    build_tiny_policy,
    chat_prompt,
    encode_prompt_response,
    encode_prompts,
    load_policy,
    load_processor,
    vision_special_ids,
)

FORMAT = " Put the final answer in \\boxed{}."


def _check_ids(model, processor):
    tok = processor.tokenizer
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>")]
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    assert len(set(ids)) == 14 and tok.unk_token_id not in ids
    # each special token encodes to exactly its own id
    for t, i in zip(QWEN_SPECIAL_TOKENS, ids):
        assert tok(t, add_special_tokens=False)["input_ids"] == [i]


def _generate(model, processor, n_new=8, sample=True):
    ex = synthetic.make_example(0)
    inputs = encode_prompts(processor, [chat_prompt(processor, ex.problem, FORMAT)] * 2, [ex.image] * 2)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=sample,
                             suppress_tokens=vision_special_ids(model.config))
    return inputs, out[:, inputs["input_ids"].shape[1]:]


def test_tiny_folder_is_an_ordinary_hf_folder(tiny_policy_dir):
    names = {p.name for p in tiny_policy_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= names
    cfg = json.loads((tiny_policy_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_vl"
    # stock class names, so vLLM / AutoProcessor elsewhere can read the folder
    assert json.loads((tiny_policy_dir / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    pre = json.loads((tiny_policy_dir / "preprocessor_config.json").read_text())
    assert pre["patch_size"] == 14 and pre["merge_size"] == 2
    assert (pre["min_pixels"], pre["max_pixels"]) == (TINY_MIN_PIXELS, TINY_MAX_PIXELS)  # what vLLM reads
    text = cfg["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert head_dim in (64, 128)
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2


def test_reload_local_only_ids_match_and_generate(tiny_policy_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_policy(tiny_policy_dir)
    processor = load_processor(tiny_policy_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 2e7, n_params
    _check_ids(model, processor)
    inputs, new = _generate(model, processor, n_new=12)
    assert new.shape == (2, 12)
    # a random policy samples anything except the suppressed vision tokens
    assert not torch.isin(new, torch.tensor(vision_special_ids(model.config))).any()
    assert inputs["pixel_values"].shape == (128, 1176)  # 2 images x 64 patches at 112 x 112
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [16, 16]


def test_qwen2_5_vl_tiny_builds_loads_and_generates(tmp_path):
    path = build_tiny_policy(tmp_path / "q25", arch="qwen2_5_vl", seed=1)
    model = load_policy(path)
    processor = load_processor(path)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    _check_ids(model, processor)
    _, new = _generate(model, processor, n_new=6)
    assert new.shape == (2, 6)


def test_build_is_deterministic_by_seed(tmp_path, tiny_policy_dir):
    again = load_policy(build_tiny_policy(tmp_path / "again", seed=0)).state_dict()
    first = load_policy(tiny_policy_dir).state_dict()
    other = load_policy(build_tiny_policy(tmp_path / "other", seed=1)).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_tokenizer_round_trips_any_text(tiny_policy_dir):
    tok = load_processor(tiny_policy_dir).tokenizer
    for text in ["\\boxed{\\frac{\\sqrt{3}}{2}}", "x = 180 - 40 - 70 = 70. \\boxed{70}", "naïve 数学 🙂 \t\n",
                 "__import__('os')"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_bad_folders_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        load_policy(tmp_path / "missing")
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="llama"):
        load_processor(bad)


def test_chat_prompt_places_one_image(tiny_policy_dir):
    processor = load_processor(tiny_policy_dir)
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    t = chat_prompt(processor, "<image>How many?", FORMAT)
    assert t.endswith("<|im_start|>assistant\n") and f"{pad}How many?{FORMAT}<|im_end|>" in t
    t = chat_prompt(processor, "Look: <image> then answer.")
    assert "Look: " + pad + " then answer." in t
    t = chat_prompt(processor, "No mark here.")
    assert pad + "No mark here." in t
    t = chat_prompt(processor, "<image><image>Two marks.")
    assert t.count("<|image_pad|>") == 1


def test_teacher_forcing_batch_matches_single_rows(tiny_policy_dir):
    model = load_policy(tiny_policy_dir)
    processor = load_processor(tiny_policy_dir)
    exs = [synthetic.make_example(i) for i in range(3)]
    texts = [chat_prompt(processor, e.problem, FORMAT) for e in exs]
    responses = [processor.tokenizer(e.solution + "<|im_end|>")["input_ids"] for e in exs]
    inputs, mask = encode_prompt_response(processor, texts, [e.image for e in exs], responses)
    assert mask.sum(1).tolist() == [len(r) for r in responses]
    for i in range(3):
        assert inputs["input_ids"][i][mask[i]].tolist() == responses[i]
    with torch.no_grad():
        batched = model(**inputs).logits
        for i in range(3):
            single_in, _ = encode_prompt_response(processor, texts[i:i + 1], [exs[i].image], responses[i:i + 1])
            single = model(**single_in).logits[0]
            n = single.shape[0]
            torch.testing.assert_close(batched[i, :n], single, atol=1e-4, rtol=1e-4)


def test_image_reaches_the_model(tiny_policy_dir):
    model = load_policy(tiny_policy_dir)
    processor = load_processor(tiny_policy_dir)
    ex = synthetic.make_example(0)
    text = chat_prompt(processor, ex.problem, FORMAT)
    black = np.zeros_like(np.asarray(ex.image))
    with torch.no_grad():
        a = model(**encode_prompts(processor, [text], [ex.image])).logits[0, -1]
        b = model(**encode_prompts(processor, [text], [black])).logits[0, -1]
    assert (a - b).abs().max() > 1e-4

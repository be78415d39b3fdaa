"""Policies for the benchmarks: the tiny one, or a randomly initialised Qwen2.5-VL-3B-shaped one.

No weights are downloaded: the 3B shape is built from Qwen2.5-VL-3B-Instruct's published config with
the tiny policy's tokenizer and processor (its 648-token vocabulary stays valid: only the embedding
table is larger). `write_policy` saves a loadable folder for code that takes a path (learner
workers, engines); `build_policy` returns the model in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from core.policy import TINY_MIN_PIXELS, build_tiny_policy, load_policy, load_processor

# Qwen2.5-VL-3B-Instruct's published shape.
_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                vocab_size=151936, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                     "mrope_section": [16, 24, 24]})
_3B_VISION = dict(depth=32, hidden_size=1280, out_hidden_size=2048, intermediate_size=3420, num_heads=16,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="silu",
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
SHAPES = ("tiny", "3b")


def _set_max_pixels(folder: Path, max_pixels: int) -> None:
    """Let the processor keep images up to `max_pixels` (the tiny policy's default is 224 x 224)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = folder / name
        data = json.loads(f.read_text())
        ip = data.get("image_processor", data)
        ip["size"] = {"shortest_edge": TINY_MIN_PIXELS, "longest_edge": max_pixels}
        if "max_pixels" in ip:
            ip["max_pixels"], ip["min_pixels"] = max_pixels, TINY_MIN_PIXELS
        f.write_text(json.dumps(data, indent=2))


def _random_3b(tiny_config, device: str, dtype: torch.dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    t = tiny_config
    cfg = Qwen2_5_VLConfig(text_config=dict(_3B_TEXT, bos_token_id=t.text_config.bos_token_id,
                                            eos_token_id=t.text_config.eos_token_id,
                                            pad_token_id=t.text_config.pad_token_id),
                           vision_config=_3B_VISION, image_token_id=t.image_token_id,
                           video_token_id=t.video_token_id, vision_start_token_id=t.vision_start_token_id,
                           vision_end_token_id=t.vision_end_token_id, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
    return model


def build_policy(shape: str, folder: Path, image_size: int, device: str, dtype: torch.dtype = torch.float32):
    """(model, processor) of `shape` in memory; `folder` receives the tiny policy it starts from."""
    path = build_tiny_policy(folder, arch="qwen2_5_vl")
    processor = load_processor(path)
    processor.image_processor.size = {"shortest_edge": TINY_MIN_PIXELS, "longest_edge": image_size * image_size}
    if shape == "3b":
        return _random_3b(load_policy(path).config, device, dtype), processor
    return load_policy(path, dtype=dtype, device=device), processor


def write_policy(shape: str, folder: Path, image_size: int, device: str = "cpu",
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    """A policy folder of `shape` (reused when `folder` already holds one of that shape)."""
    folder = Path(folder)
    marker = folder / ".bench-shape"
    if marker.is_file() and marker.read_text() == f"{shape} {image_size}":
        return folder
    path = build_tiny_policy(folder, arch="qwen2_5_vl")
    if shape == "3b":
        model = _random_3b(load_policy(path).config, device, dtype)
        for f in folder.glob("*.safetensors"):
            f.unlink()
        model.save_pretrained(str(folder))
        del model
    _set_max_pixels(folder, image_size * image_size)
    marker.write_text(f"{shape} {image_size}")
    return folder

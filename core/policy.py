"""The policy: loading a local Qwen2-VL / Qwen2.5-VL checkpoint, and the one place to import it from.

This module loads models (`load_policy`, `resolve_dtype`, `vision_special_ids`) and re-exports the
rest of what callers use under `core.policy`:
- core/processors.py: `load_processor`, `save_processor`, `model_type`, `image_size_limits` (the
  processor without torchvision);
- core/tiny_policy.py: `build_tiny_policy` and its tokenizer/config (the embedded default's model);
- core/encoding.py: `chat_prompt`, `encode_prompts`, `encode_prompt_response`, `encode_groups`,
  `response_layout`, `response_hidden` (model inputs and the packed scoring forward).

Traps of transformers 5.x without torchvision (../shared/STACK-NOTES.md): the model needs
`mm_token_type_ids`; sampling must suppress the vision special tokens (`vision_special_ids`).
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForImageTextToText, PreTrainedModel

from core.encoding import (
    chat_prompt,
    encode_groups,
    encode_prompt_response,
    encode_prompts,
    response_hidden,
    response_layout,
)
from core.processors import (
    ARCHES,
    Qwen2_5_VLProcessorNoVideo,
    Qwen2VLProcessorNoVideo,
    image_size_limits,
    load_processor,
    model_type,
    save_processor,
)
from core.tiny_policy import (
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    build_tiny_policy,
    tiny_config,
    train_tokenizer,
)

__all__ = [
    "ARCHES", "QWEN2_VL_CHAT_TEMPLATE", "QWEN_SPECIAL_TOKENS", "TINY_MAX_PIXELS", "TINY_MIN_PIXELS",
    "Qwen2VLProcessorNoVideo", "Qwen2_5_VLProcessorNoVideo", "build_tiny_policy", "chat_prompt",
    "encode_groups", "encode_prompt_response", "encode_prompts", "image_size_limits", "load_policy",
    "load_processor", "model_type", "resolve_dtype", "response_hidden", "response_layout", "save_processor",
    "tiny_config", "train_tokenizer", "vision_special_ids",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere (bf16 matmuls are slow on these CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_policy(path: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
                attn_implementation: str | None = "sdpa") -> PreTrainedModel:
    """A Qwen2-VL / Qwen2.5-VL policy from a local folder (tiny or a real checkpoint), in eval mode."""
    model_type(path)  # a clear error before transformers' own
    model = AutoModelForImageTextToText.from_pretrained(
        str(path),
        local_files_only=True,
        dtype=resolve_dtype(dtype, device),
        attn_implementation=attn_implementation,
    )
    return model.to(device).eval()


def vision_special_ids(config) -> list[int]:
    """Token ids a policy must never sample: a sampled image pad breaks the next forward."""
    ids = [config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id]
    return sorted({int(i) for i in ids if i is not None})

"""The tiny Qwen2-VL-architecture policy, built without any hub: the embedded default's model.

`build_tiny_policy` writes an ordinary Hugging Face folder (config, safetensors weights, a byte-level
BPE tokenizer trained locally, the Qwen2-VL chat template and image processor), so every other part
of the system loads the embedded default exactly as it loads a real checkpoint: `load_policy` and
`load_processor` with `local_files_only=True`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from core.processors import ARCHES, PROCESSORS, save_processor

log = logging.getLogger(__name__)

# Qwen2-VL's 14 special tokens, in Qwen's order (ids follow the trained vocabulary here).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The chat template Qwen2-VL-Instruct ships (system prompt inserted when none is given).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Image size limits of the tiny policy's processor: small images keep CPU steps fast. A real
# checkpoint keeps its own limits (its preprocessor_config.json).
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 224 * 224

# Sizes of the tiny policy. Text head_dim is 64 (hidden 128 / 2 heads), which vLLM's attention
# kernels accept; mrope_section sums to head_dim / 2.
_TINY_TEXT = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [8, 12, 12]},
)
_TINY_VISION = {
    "qwen2_vl": dict(depth=4, embed_dim=128, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu"),
    "qwen2_5_vl": dict(depth=4, hidden_size=128, out_hidden_size=128, intermediate_size=256, num_heads=2,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                       hidden_act="silu", window_size=112, fullatt_block_indexes=[1, 3]),
}

_MODELS = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, with Qwen's special tokens and chat template.

    Byte-level, as Qwen's own tokenizer is, so that any text (model output included) round-trips.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        model_max_length=4096,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return fast


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks Qwen special tokens {missing}")
    return ids


def tiny_config(arch: str, tokenizer: PreTrainedTokenizerFast) -> Qwen2VLConfig | Qwen2_5_VLConfig:
    """The tiny model config for `arch`, with every special token id taken from `tokenizer`."""
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    ids = _special_ids(tokenizer)
    text = dict(
        _TINY_TEXT,
        vocab_size=len(tokenizer),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    cls = Qwen2VLConfig if arch == "qwen2_vl" else Qwen2_5_VLConfig
    return cls(
        text_config=text,
        vision_config=dict(_TINY_VISION[arch]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny_policy(out_dir: str | os.PathLike, arch: str = "qwen2_vl", seed: int = 0,
                      texts: list[str] | None = None) -> Path:
    """Write a tiny, randomly initialised Qwen2-VL-architecture policy as a Hugging Face folder.

    `texts` trains the tokenizer; by default the synthetic task's own text (core.synthetic), so the
    vocabulary covers every prompt and answer of the embedded task. Returns the folder.
    """
    from core import synthetic  # the task text is the tokenizer's corpus; a core-internal import

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts if texts is not None else synthetic.corpus_texts(seed=seed))
    config = tiny_config(arch, tokenizer)
    torch.manual_seed(seed)
    model = _MODELS[arch](config)
    model.generation_config.eos_token_id = [config.text_config.eos_token_id]
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    processor = PROCESSORS[arch](image_processor=image_processor, tokenizer=tokenizer,
                                  chat_template=QWEN2_VL_CHAT_TEMPLATE)
    save_processor(processor, out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built tiny %s policy (%.2fM parameters, vocab %d) in %s", arch, n_params / 1e6, len(tokenizer), out)
    return out

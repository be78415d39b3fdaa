"""Policy and processor loading, and the tiny Qwen2-VL-architecture policy built without any hub.

`build_tiny_policy` writes an ordinary Hugging Face folder (config, safetensors weights, a byte-level
BPE tokenizer trained locally, the Qwen2-VL chat template and image processor), so every other part
of the system loads the embedded default exactly as it loads a real checkpoint: `load_policy` and
`load_processor` with `local_files_only=True`.

Traps of transformers 5.x without torchvision (../shared/STACK-NOTES.md): the image processor falls
back to the PIL one; the Qwen2-VL processor cannot be built with a video processor, so the folder is
loaded through subclasses that have none; the model needs `mm_token_type_ids`; sampling must
suppress the vision special tokens (`vision_special_ids`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

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
ARCHES = tuple(_TINY_VISION)


class Qwen2VLProcessorNoVideo(Qwen2VLProcessor):
    """Qwen2-VL processor without a video processor (none can be built without torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLProcessorNoVideo(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without a video processor (none can be built without torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


_PROCESSORS = {"qwen2_vl": Qwen2VLProcessorNoVideo, "qwen2_5_vl": Qwen2_5_VLProcessorNoVideo}
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
    processor = _PROCESSORS[arch](image_processor=image_processor, tokenizer=tokenizer,
                                  chat_template=QWEN2_VL_CHAT_TEMPLATE)
    save_processor(processor, out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built tiny %s policy (%.2fM parameters, vocab %d) in %s", arch, n_params / 1e6, len(tokenizer), out)
    return out


def save_processor(processor, folder: str | os.PathLike) -> None:
    """`processor.save_pretrained(folder)`, plus what stock loaders need: the standard processor class
    name and a `preprocessor_config.json` as real checkpoints have.

    The folder must load with stock classes elsewhere (vLLM, AutoProcessor on a host with
    torchvision), which cannot resolve our no-video subclass; vLLM reads the image processor from
    `preprocessor_config.json` (transformers 5 itself writes only `processor_config.json`).
    """
    folder = Path(folder)
    processor.save_pretrained(folder)
    arch = "qwen2_5_vl" if isinstance(processor, Qwen2_5_VLProcessor) else "qwen2_vl"
    cfg_path = folder / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["processor_class"] = "Qwen2VLProcessor" if arch == "qwen2_vl" else "Qwen2_5_VLProcessor"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    image_cfg = dict(cfg.get("image_processor", {}))
    image_cfg["processor_class"] = cfg["processor_class"]
    image_cfg["min_pixels"] = image_cfg.get("size", {}).get("shortest_edge", TINY_MIN_PIXELS)
    image_cfg["max_pixels"] = image_cfg.get("size", {}).get("longest_edge", TINY_MAX_PIXELS)
    (folder / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=2))


def model_type(path: str | os.PathLike) -> str:
    """`model_type` of a local Hugging Face folder (`qwen2_vl` or `qwen2_5_vl`), with a clear error."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: no config.json; model.path must be a local Hugging Face folder")
    kind = json.loads(cfg.read_text()).get("model_type")
    if kind not in ARCHES:
        raise ValueError(f"{cfg}: model_type {kind!r} is not supported (supported: {ARCHES})")
    return kind


def load_processor(path: str | os.PathLike):
    """The processor of a local Qwen2-VL / Qwen2.5-VL folder, loaded without a video processor."""
    return _PROCESSORS[model_type(path)].from_pretrained(str(path), local_files_only=True)


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


def _image_processor(processor):
    """The image processor of a full processor, or the argument itself if it is one."""
    return getattr(processor, "image_processor", processor)


def _size_entry(size, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def image_size_limits(processor) -> tuple[int, int, int]:
    """(min_pixels, max_pixels, factor) the processor's `smart_resize` uses; data is fitted to them.

    `processor` is a full processor or its image processor; both the `size` dict of transformers 5
    and the older `min_pixels` / `max_pixels` attributes are read.
    """
    ip = _image_processor(processor)
    size = getattr(ip, "size", None)
    min_pixels = _size_entry(size, "shortest_edge") or getattr(ip, "min_pixels", None)
    max_pixels = _size_entry(size, "longest_edge") or getattr(ip, "max_pixels", None)
    if not min_pixels or not max_pixels:
        raise ValueError(f"image processor {type(ip).__name__} has no min/max pixels (size={size!r})")
    return int(min_pixels), int(max_pixels), int(ip.patch_size) * int(ip.merge_size)


def chat_prompt(processor, problem: str, format_prompt: str = "") -> str:
    """Chat-templated prompt text with one image where `<image>` stood (first, when it is absent).

    A data set may hold several `<image>` marks for one image (geometry3k does not, MM-Eureka rarely);
    only the first becomes the image, the rest are dropped, so the image pad count always matches.
    """
    before, mark, after = (problem + format_prompt).partition("<image>")
    if not mark:
        before, after = "", before
    after = after.replace("<image>", "")
    content = ([{"type": "text", "text": before}] if before.strip() else []) + [{"type": "image"}]
    if after.strip():
        content.append({"type": "text", "text": after})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(processor, texts: list[str], images: list) -> dict[str, torch.Tensor]:
    """Left-padded generation inputs for prompts with one image each.

    Returns input_ids, attention_mask, mm_token_type_ids ([B, L] int64), pixel_values
    ([patches, C*T*14*14] float32) and image_grid_thw ([B, 3] int64).
    """
    processor.tokenizer.padding_side = "left"
    enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
    return dict(enc)


def encode_prompt_response(processor, texts: list[str], images: list,
                           responses: list[list[int] | torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded teacher-forcing inputs `prompt + response` and the mask of response tokens.

    `responses[i]` are token ids ([T_i] int64). Returns the model inputs (input_ids, attention_mask,
    mm_token_type_ids [B, L] int64; pixel_values [patches, D] float32; image_grid_thw [B, 3] int64)
    and `response_mask` ([B, L] bool, True at the positions of response tokens). The logits that
    predict response token j sit one position earlier: use `response_mask[:, 1:]` against
    `logits[:, :-1]`.
    """
    processor.tokenizer.padding_side = "left"
    enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
    keep = enc["attention_mask"].bool()
    prompts = [(enc["input_ids"][i][keep[i]], enc["mm_token_type_ids"][i][keep[i]]) for i in range(len(texts))]
    inputs, response_mask = _right_padded(prompts, responses, processor.tokenizer.pad_token_id)
    inputs.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    return inputs, response_mask


def _right_padded(prompts: list[tuple[torch.Tensor, torch.Tensor]], responses: list, pad: int):
    """Rows `prompt + response`, right-padded; prompts are (ids [P] int64, mm types [P] int64)."""
    rows, types, resp_lens = [], [], []
    for (ids, typ), resp in zip(prompts, responses):
        resp = torch.as_tensor(resp, dtype=torch.long).reshape(-1)
        rows.append(torch.cat([ids, resp]))
        types.append(torch.cat([typ, torch.zeros_like(resp)]))
        resp_lens.append(resp.numel())
    length = max(r.numel() for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    mm_types = torch.zeros((batch, length), dtype=torch.long)
    response_mask = torch.zeros((batch, length), dtype=torch.bool)
    for i, (row, typ, n_resp) in enumerate(zip(rows, types, resp_lens)):
        n = row.numel()
        input_ids[i, :n] = row
        attention_mask[i, :n] = 1
        mm_types[i, :n] = typ
        response_mask[i, n - n_resp:n] = True
    return dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_types), response_mask


def encode_groups(processor, groups: list[tuple[str, object, list]],
                  shared_prefix: bool = True) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Teacher-forcing inputs for the responses of several (prompt text, image, responses) groups.

    shared_prefix=True: one row per group, `prompt + response_1 + ... + response_n`; each response
    attends to the prompt and to itself only (`segments` tells `response_hidden` how), so the prompt
    (image tokens, problem text: most of the tokens when responses are short) runs once instead of n
    times, as Prefix Grouper (arXiv 2506.05433) does for GRPO. shared_prefix=False: one row per
    response (`prompt + response`, right-padded); kernels without custom masks (flash_attention_2)
    need this. Either way each image is processed once.

    Returns (inputs, rows_per_image). inputs: input_ids, attention_mask, mm_token_type_ids [rows, L]
    int64; pixel_values [patches, D] float32 (one copy per group); image_grid_thw [K, 3] int64;
    segments [rows, L] int64 (0 prompt, i + 1 response i of the row, -1 padding); seg_pos [rows, L]
    int64 (a token's index within its response); predict_from [N] int64 (flat index into rows x L of
    the position whose hidden state predicts each response token, response-major: response 0's tokens,
    then response 1's ...); targets [N] int64 (those tokens); response_mask [R, T] bool (response r's
    tokens, left-aligned: the layout `[N]` values unflatten into, one row per response).
    rows_per_image: the rows of each group (1 each with shared_prefix).
    """
    pad = processor.tokenizer.pad_token_id
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # ids, mm types, segments, seg_pos
    sources: list[tuple[int, torch.Tensor]] = []  # (row, positions predicting each token) per response
    responses_all: list[torch.Tensor] = []
    pixel_values, grids, rows_per_image = [], [], []
    for text, image, responses in groups:
        enc = processor(text=[text], images=[image], return_tensors="pt")
        prompt, types = enc["input_ids"][0], enc["mm_token_type_ids"][0]
        pixel_values.append(enc["pixel_values"])
        grids.append(enc["image_grid_thw"])
        resp = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in responses]
        responses_all.extend(resp)
        n_prompt = prompt.numel()
        if shared_prefix:
            start = n_prompt
            for r in resp:
                # token 0 is predicted from the prompt's last position, token j from the response's own j-1
                sources.append((len(rows), torch.cat([torch.tensor([n_prompt - 1]), start + torch.arange(r.numel() - 1)])
                                if r.numel() else torch.zeros(0, dtype=torch.long)))
                start += r.numel()
            rows.append((torch.cat([prompt, *resp]), torch.cat([types, *[torch.zeros_like(r) for r in resp]]),
                         torch.cat([torch.zeros(n_prompt, dtype=torch.long)] +
                                   [torch.full((r.numel(),), i + 1, dtype=torch.long) for i, r in enumerate(resp)]),
                         torch.cat([torch.zeros(n_prompt, dtype=torch.long)] + [torch.arange(r.numel()) for r in resp])))
            rows_per_image.append(1)
        else:
            for r in resp:
                sources.append((len(rows), n_prompt - 1 + torch.arange(r.numel())))
                rows.append((torch.cat([prompt, r]), torch.cat([types, torch.zeros_like(r)]),
                             torch.cat([torch.zeros(n_prompt, dtype=torch.long), torch.ones(r.numel(), dtype=torch.long)]),
                             torch.cat([torch.zeros(n_prompt, dtype=torch.long), torch.arange(r.numel())])))
            rows_per_image.append(len(resp))
    length = max(r[0].numel() for r in rows)

    def right_pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, length - t.numel()), value=value)

    inputs = {
        "input_ids": torch.stack([right_pad(r[0], pad) for r in rows]),
        "attention_mask": torch.stack([right_pad(torch.ones_like(r[0]), 0) for r in rows]),
        "mm_token_type_ids": torch.stack([right_pad(r[1], 0) for r in rows]),
        "segments": torch.stack([right_pad(r[2], -1) for r in rows]),
        "seg_pos": torch.stack([right_pad(r[3], 0) for r in rows]),
        "pixel_values": torch.cat(pixel_values),
        "image_grid_thw": torch.cat(grids),
        "predict_from": torch.cat([row * length + pos for row, pos in sources]) if sources
        else torch.zeros(0, dtype=torch.long),
        "targets": torch.cat(responses_all) if responses_all else torch.zeros(0, dtype=torch.long),
        "response_mask": response_layout([r.numel() for r in responses_all]),
    }
    return inputs, rows_per_image


def response_layout(lengths: list[int]) -> torch.Tensor:
    """[R, max(lengths)] bool: row r is True on its first lengths[r] entries (how per-token values of R
    responses, concatenated response-major, unflatten with `masked_scatter`)."""
    width = max(lengths, default=0)
    return torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]


def _vision_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Merged features [tokens_k, D] of each image, from one vision-tower forward over all of them."""
    visual = model.model.visual
    out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5.x: an output object
    if isinstance(feats, (tuple, list)):
        feats = torch.cat(list(feats))
    merge = visual.spatial_merge_size ** 2
    return list(torch.split(feats, (grid_thw.prod(-1) // merge).tolist()))


def _rope_index(model, inputs: dict[str, torch.Tensor], row_grids: torch.Tensor) -> torch.Tensor:
    """mrope position ids [3, R, L] for R rows, row r holding the image of grid row_grids[r]."""
    kwargs = dict(image_grid_thw=row_grids, attention_mask=inputs["attention_mask"])
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    return model.model.get_rope_index(inputs["input_ids"], **kwargs)[0]


def response_hidden(model, inputs: dict[str, torch.Tensor], pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                    rows_per_image: list[int]) -> torch.Tensor:
    """Hidden states [N, D] that predict each response token of `encode_groups` inputs (response-major),
    the vision tower run once per image.

    inputs: as `encode_groups` returns them (on the model's device); pixel_values [patches, D] float of
    the K images (may require grad: the attack differentiates through it); grid_thw [K, 3] int64;
    rows_per_image: rows of each image. Each image's features are spliced into all its rows, so their
    gradients add up on the one image: the same values and gradients as the model's own forward on
    per-response copies. With shared-prefix rows the attention mask is 4D: causal, and a response sees
    the prompt and itself, never another response; each response token sits at the position it would
    have right after the prompt. The language-model head is left to the caller, which runs it on these
    N positions only (a 150k vocabulary makes [R, L, V] logits the largest tensor of a step).
    """
    ids, segments = inputs["input_ids"], inputs["segments"]
    embeds = model.get_input_embeddings()(ids)
    feats = _vision_features(model, pixel_values, grid_thw)
    image = torch.cat([f.repeat(n, 1) for f, n in zip(feats, rows_per_image)]).to(embeds.dtype)
    image_slots = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image_slots, image)
    row_grids = torch.repeat_interleave(grid_thw, torch.tensor(rows_per_image, device=grid_thw.device), dim=0)
    prompt = segments == 0
    # the prompt's mrope positions; a response's token j goes at (the prompt's last position) + 1 + j in
    # all three sections, as text after the image does in an unpacked row
    position_ids = _rope_index(model, {**inputs, "attention_mask": prompt.long()}, row_grids)
    last = torch.where(prompt, position_ids, torch.zeros_like(position_ids)).amax(-1, keepdim=True)
    position_ids = torch.where(segments > 0, last + 1 + inputs["seg_pos"], position_ids)
    mask = inputs["attention_mask"]  # one response per row: the model's own causal mask over it
    if bool((segments > 1).any()):
        length = ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        q, k = segments[:, :, None], segments[:, None, :]
        allowed = causal & (k >= 0) & ((k == 0) | (k == q))
        # a padding position sees itself only: a query with no key at all would give NaN in sdpa
        allowed |= torch.eye(length, dtype=torch.bool, device=ids.device) & (q < 0)
        mask = allowed[:, None]  # [rows, 1, L, L] bool
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=position_ids).last_hidden_state
    return hidden.flatten(0, 1)[inputs["predict_from"]]

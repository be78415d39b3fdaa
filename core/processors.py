"""The Qwen2-VL / Qwen2.5-VL processor of a local policy folder, without torchvision.

transformers 5.x without torchvision (../shared/STACK-NOTES.md) falls back to the PIL image
processor and cannot build the Qwen2-VL processor with a video processor, so a folder is loaded
through subclasses that have none (`load_processor`) and saved so that stock loaders (vLLM,
AutoProcessor with torchvision) still read it (`save_processor`). Also here: what a folder is
(`model_type`) and the image size limits data is fitted to (`image_size_limits`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

ARCHES = ("qwen2_vl", "qwen2_5_vl")  # the model_type values this project loads and builds


class Qwen2VLProcessorNoVideo(Qwen2VLProcessor):
    """Qwen2-VL processor without a video processor (none can be built without torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLProcessorNoVideo(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without a video processor (none can be built without torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


PROCESSORS = {"qwen2_vl": Qwen2VLProcessorNoVideo, "qwen2_5_vl": Qwen2_5_VLProcessorNoVideo}


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
    # the processor's own limits (its `size`, or older min/max_pixels attributes), never a default
    image_cfg["min_pixels"], image_cfg["max_pixels"], _ = image_size_limits(processor)
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
    return PROCESSORS[model_type(path)].from_pretrained(str(path), local_files_only=True)


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

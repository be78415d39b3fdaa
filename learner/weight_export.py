"""A learner rank's weights leaving the FSDP2 shards: the full state dict, the streamed broadcast to a
weight group, and the Hugging Face folder of a checkpoint.

Every function that gathers shards is a collective: each rank calls it, rank 0 keeps the result.
Names lose the `Scorer` prefix, so what leaves is the policy's own Hugging Face state dict.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from core import weights
from learner.scorer import PREFIX, Scorer


def full_weights(model: Scorer, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The full state dict (Hugging Face names, cast to `dtype`) on rank 0; {} elsewhere. A collective."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return {}
    return {k[len(PREFIX):]: v.to(dtype) for k, v in full.items()}


def broadcast_sharded(model: Scorer, rank: int, dtype: torch.dtype, group: weights.WeightGroup | None,
                      version: int, bucket_bytes: int) -> float:
    """Send the weights (cast to `dtype`) as `version` through `group` (rank 0, the group's sender; None
    on the other ranks). A collective of the learner ranks. Returns the bytes sent (rank 0) or 0.

    Streamed from the shards: each tensor is gathered (`full_tensor`, every rank) only when its bucket
    is about to leave, so rank 0 holds one bucket and one tensor, never a second full copy.
    """
    sd = model.state_dict()
    names = [k for k in sd if k.startswith(PREFIX)]
    meta = [(k[len(PREFIX):], tuple(sd[k].shape), dtype) for k in names]

    def gathered():
        for k in names:
            v = sd[k]
            full = v.full_tensor() if isinstance(v, DTensor) else v
            yield k[len(PREFIX):], full.detach().to(dtype)

    if rank != 0:
        for _ in gathered():  # the all-gathers rank 0 drives, in the same order
            pass
        return 0.0
    stream = gathered()
    try:
        manifest = weights.send(group, stream, meta, version, bucket_bytes)
    except Exception:
        for _ in stream:  # the other ranks wait in the same all-gathers: let them finish
            pass
        raise
    return float(sum(manifest.bucket_sizes))


def write_hf_folder(folder: Path, model_path: str, config, full: dict[str, torch.Tensor]) -> None:
    """A Hugging Face folder of the policy: `full` (from `full_weights`) as safetensors, `config` (the
    policy's transformers config), and the tokenizer / processor files of `model_path` unchanged."""
    from transformers import AutoModelForImageTextToText

    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(model_path).iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy2(f, folder / f.name)
    with torch.device("meta"):
        shell = AutoModelForImageTextToText.from_config(config)
    shell.load_state_dict(full, strict=True, assign=True)
    shell.save_pretrained(str(folder))

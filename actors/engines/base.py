"""The engine interface: what a rollout actor asks of an inference engine, and what it gets back.

An engine serves one policy: `generate(requests, sampling)` returns exactly `n` samples per request,
in request order, and `load_weights(state_dict)` swaps the policy's weights in place. Two engines
implement it: `actors.engines.hf.HFEngine` (transformers `generate`, the embedded CPU default and
the reference) and `actors.engines.vllm.VLLMEngine` (the production engine, on GPU and on CPU). They agree on these definitions:

- A request's samples depend only on (its seed, its prompt, its image, the sampling settings, the
  weights), never on the other requests of a call: sample i draws from its own random stream, seeded
  by `sample_seed(request.seed, i)`. (Float noise from batching can still flip a draw in rare
  near-ties; each engine documents what holds exactly.)
- `logprobs` are the raw log-softmax of the model's logits at temperature 1, taken at the sampled
  token: before temperature, top-k/top-p and the vision-token ban. They equal a teacher-forced forward
  of the same weights up to float noise, whatever the sampling settings.
- Generation stops at the end-of-turn token (`end_of_turn_ids`), which stays in `response_ids`, or
  at a stop string: `text` is cut right after the stop string (which it keeps, so `</answer>` style
  stops stay visible to the reward) and `response_ids` end with the token that completed it (that
  token may carry characters past the stop string; they are in the ids, not in `text`).
- The vision special tokens (core.policy.vision_special_ids) are never sampled: a sampled
  `<|image_pad|>` breaks the next forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from core.config import SamplingConfig

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationRequest:
    """n samples of one chat-templated prompt with one image."""

    prompt: str
    """Chat-templated prompt text (core.policy.chat_prompt): one `<|vision_start|><|image_pad|><|vision_end|>`."""
    image: np.ndarray  # [H, W, 3] uint8, RGB
    """The image, already fitted (core.data.fit_image) so that the processor does not resize it."""
    n: int
    """Samples wanted (0 gives an empty list)."""
    seed: int
    """Sampling seed; sample i uses `sample_seed(seed, i)`."""
    key: object = None
    """Opaque to the engine: lets the caller route results."""

    def __post_init__(self) -> None:
        img = self.image
        if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
            got = f"{type(img).__name__} {getattr(img, 'dtype', '')} {getattr(img, 'shape', '')}"
            raise ValueError(f"GenerationRequest: image must be a [H, W, 3] uint8 array, got {got}")
        if self.n < 0:
            raise ValueError(f"GenerationRequest: n must be >= 0, got {self.n}")


@dataclass
class GenerationResult:
    """One sampled response."""

    response_ids: torch.Tensor  # [T] int64, T >= 1
    """Generated token ids without prompt or padding; end with the end-of-turn token when it stopped there."""
    text: str
    """Decoded response (special tokens skipped), cut after a stop string. Untrusted model output."""
    logprobs: torch.Tensor  # [T] float32
    """Raw log-softmax of the logits at temperature 1 at each sampled token (= teacher forcing)."""
    finish_reason: FinishReason
    """`stop` (end-of-turn token or stop string) or `length` (max_new_tokens reached)."""


@dataclass
class GenerationStats:
    """Throughput of one `generate` call."""

    prompt_tokens: int = 0
    """Prompt tokens (image tokens included, padding excluded), counted once per sample."""
    generated_tokens: int = 0
    """Response tokens returned (sum of len(response_ids))."""
    seconds: float = 0.0
    """Wall time of the call."""
    requests: int = 0
    """Requests in the call."""
    samples: int = 0
    """Samples returned."""

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


class EngineDied(RuntimeError):
    """The engine's own processes are gone (killed, out of memory, crashed): it cannot serve again.

    A rollout actor that sees it exits, so that Ray restarts it with a fresh engine and the pool sends
    its requests again."""


class Engine(Protocol):
    """What every engine offers (see the module docstring for the shared definitions)."""

    last_stats: GenerationStats
    """Throughput of the latest `generate` call."""

    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[list[GenerationResult]]:
        """Exactly `n` results per request, in request order; inner index i is sample i."""
        ...

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Replace every weight: a full state dict with the names `model.state_dict()` gives."""
        ...

    def close(self) -> None:
        """Free the engine's memory (and processes); the engine is unusable afterwards."""
        ...


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of a request seeded `seed`: well mixed, in [0, 2**63).

    Hashing (not seed + index) keeps the streams of (seed, 1) and (seed + 1, 0) apart.
    """
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def end_of_turn_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end a response: `<|im_end|>`, the tokenizer's eos and the checkpoint's eos ids.

    (Qwen2-VL-Instruct's generation_config lists `<|im_end|>` and `<|endoftext|>`.)
    """
    ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    eos = getattr(generation_config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return sorted(int(i) for i in ids if i is not None and i != tokenizer.unk_token_id)


def check_sampling(sampling: SamplingConfig) -> None:
    """Reject settings no engine can honour (the config validates the same for the YAML path)."""
    if sampling.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if not (sampling.top_k == -1 or sampling.top_k > 0):
        raise ValueError(f"top_k must be -1 or > 0, got {sampling.top_k}")
    if sampling.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
    if any(not s for s in sampling.stop):
        raise ValueError("stop strings must be non-empty")


def check_state_dict(named_tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise unless `named_tensors` has exactly the names of `expected` (name -> shape), with those shapes.

    Both engines check before copying anything, so a bad dict leaves the served weights as they were.
    """
    missing = sorted(set(expected) - set(named_tensors))
    unexpected = sorted(set(named_tensors) - set(expected))
    if missing or unexpected:
        raise KeyError(f"load_weights: {len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} "
                       f"unexpected key(s) {unexpected[:5]} (expected the names of model.state_dict())")
    bad = [k for k, v in named_tensors.items() if tuple(v.shape) != tuple(expected[k])]
    if bad:
        raise ValueError(f"load_weights: {len(bad)} shape mismatch(es), e.g. {bad[0]}: got "
                         f"{tuple(named_tensors[bad[0]].shape)}, the model has {tuple(expected[bad[0]])}")


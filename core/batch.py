"""Rollout data types shared by every side (actors, adversary, learner, cluster).

Plain dataclasses of numpy arrays, torch tensors and Python scalars: they pickle through Ray's
object store as they are, and import neither ray nor vllm. Images travel as uint8 numpy arrays
already resized to a size the processor will not change (see core.data.fit_image), so that the
adversary's pixel-space attack and the engines see exactly the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Prompt:
    """One task instance: an image, a question about it and the reference answer."""

    uid: str
    """Stable identifier, `<file name>:<row>` for file data; unique within a run."""
    problem: str
    """Question text; `<image>` marks where the image goes (geometry3k convention)."""
    answer: str
    """Reference answer as text (a number, a fraction or simple LaTeX); scored by core.rewards."""
    image: np.ndarray  # [H, W, 3] uint8, RGB, H and W already fitted by core.data.fit_image
    """The image, resized once so that the processor will not resize it again."""
    source: str = ""
    """File the prompt came from (empty for in-memory prompts)."""
    row: int = -1
    """Row (parquet) or line (JSONL) index in `source`, 0-based; -1 for in-memory prompts."""
    solution: str = ""
    """Optional worked solution ending in `\\boxed{answer}`; used by the supervised bootstrap only."""

    def __post_init__(self) -> None:
        img = self.image
        if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
            got = f"{type(img).__name__} {getattr(img, 'dtype', '')} {getattr(img, 'shape', '')}"
            raise ValueError(f"Prompt {self.uid!r}: image must be a [H, W, 3] uint8 array, got {got}")


@dataclass
class Sample:
    """One sampled response to one prompt, on the clean or the adversarial image."""

    prompt_uid: str
    """`Prompt.uid` of the prompt this answers."""
    response_ids: torch.Tensor  # [T] int64, generated tokens (no prompt, no padding)
    """Generated token ids, including the end-of-turn token when generation stopped on it."""
    text: str
    """Decoded response text (special tokens skipped). Untrusted model output."""
    finish_reason: str
    """`stop` (end-of-turn or a stop string) or `length` (max new tokens reached)."""
    adversarial: bool = False
    """True when sampled on the adversarial image I_adv, False on the clean image."""
    logprobs: torch.Tensor | None = None  # [T] float32, engine's sampling log-probs
    """Engine log-probs of the sampled tokens; informational (the learner recomputes its own)."""
    reward: float = 0.0
    """Scalar reward from core.rewards (0.9 * accuracy + 0.1 * format by default)."""
    accuracy: float = 0.0
    """1.0 when the extracted answer equals the reference, else 0.0."""
    format_ok: bool = False
    """True when an answer could be extracted (`\\boxed{}` or `<answer>` tags)."""
    index: int = 0
    """Position of this sample among the n samples of its (prompt, clean/adversarial) request."""


@dataclass
class Group:
    """All samples of one prompt in one step: the unit over which GRPO normalises advantages."""

    prompt: Prompt
    """The prompt, with its clean image."""
    clean: list[Sample] = field(default_factory=list)
    """The n_clean samples on the clean image, in request order."""
    adversarial: list[Sample] = field(default_factory=list)
    """The n_adv samples on the adversarial image, in request order (empty for vanilla GRPO)."""
    adv_image: np.ndarray | None = None  # [H, W, 3] uint8, same size as prompt.image
    """The perturbed image I_adv, or None when no perturbation was made."""

    @property
    def samples(self) -> list[Sample]:
        """Clean then adversarial samples: the order advantages and the learner batch use."""
        return self.clean + self.adversarial

    @property
    def rewards(self) -> torch.Tensor:  # [n_clean + n_adv] float32
        return torch.tensor([s.reward for s in self.samples], dtype=torch.float32)


@dataclass
class TrainBatch:
    """The learner's input for one step: responses to prompt images, with their advantages.

    Responses that share a prompt image share one entry of `problems` / `images`, so the learner
    runs the vision tower once per image. Built by the cluster from `Group`s; the learner
    recomputes every log-prob itself (engine log-probs are carried only to report the mismatch).
    """

    problems: list[str]
    """Question text of each context (the learner applies the chat template and format prompt)."""
    images: list[np.ndarray]  # K x [H, W, 3] uint8
    """The image of each context: the clean image, or I_adv for adversarial samples (`learn_on`)."""
    responses: list[torch.Tensor]  # N x [T_i] int64
    """Sampled response token ids, as the engine returned them."""
    context: torch.Tensor  # [N] int64, index into problems / images
    """Which context each response answers; responses of one context need not be adjacent."""
    advantages: torch.Tensor  # [N] float32
    """Group-normalised advantage of each response (learner.grpo.group_advantages)."""
    adversarial: torch.Tensor | None = None  # [N] bool
    """True for responses sampled on I_adv; splits the entropy metric (None: all clean)."""
    engine_logprobs: list[torch.Tensor] | None = None  # N x [T_i] float32
    """The engine's log-probs of the sampled tokens, for the `rollout/logprob_diff` metric only."""

    def __post_init__(self) -> None:
        n = len(self.responses)
        if len(self.problems) != len(self.images):
            raise ValueError(f"TrainBatch: {len(self.problems)} problems but {len(self.images)} images")
        if self.context.shape != (n,) or self.advantages.shape != (n,):
            raise ValueError(f"TrainBatch: {n} responses but context {tuple(self.context.shape)} and advantages "
                             f"{tuple(self.advantages.shape)}")
        if n and (int(self.context.min()) < 0 or int(self.context.max()) >= len(self.problems)):
            raise ValueError(f"TrainBatch: context indices must lie in [0, {len(self.problems)})")
        if any(r.numel() == 0 for r in self.responses):
            raise ValueError("TrainBatch: empty response (a response holds at least its end-of-turn token)")
        if self.adversarial is not None and self.adversarial.shape != (n,):
            raise ValueError(f"TrainBatch: adversarial must be [{n}], got {tuple(self.adversarial.shape)}")
        if self.engine_logprobs is not None and [t.numel() for t in self.engine_logprobs] != [
                r.numel() for r in self.responses]:
            raise ValueError("TrainBatch: engine_logprobs must match the responses' lengths")

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def num_tokens(self) -> int:
        return sum(r.numel() for r in self.responses)

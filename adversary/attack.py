"""The adversary: selective entropy of the clean responses, raised by a PGD step on the raw pixels.

`Attacker.attack(prompt, image, responses)`: teacher-forced forward of the n1 clean responses on the
image, full-vocabulary entropy at each response position, TsEC band -> selective entropy, gradient to
the uint8 image's pixels (through `pixels.image_to_model_inputs`, which equals the processor), and
`egas.pgd_attack`. The vision tower runs once per image, not once per response: its features are
spliced into all n1 rows, so the gradients of every response add up on the one image. The language
model's head runs only on response positions, in checkpointed chunks, so `[n1, L, V]` logits are
never held for a 150k vocabulary.
"""

from __future__ import annotations

import inspect
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from adversary.egas import annealed_noise_step, noise_perturb, pgd_attack
from adversary.pixels import image_to_model_inputs
from adversary.tsec import selective_entropy, token_entropy
from core.batch import Prompt
from core.config import AdversaryConfig
from core.policy import chat_prompt, encode_responses_of_prompt


@dataclass
class AttackResult:
    """The adversarial image of one prompt and what the attack measured."""

    prompt_uid: str
    """`Prompt.uid` of the attacked prompt."""
    image: np.ndarray  # [H, W, 3] uint8, same size as the clean image
    """I_adv (the clean image itself for kind `none`)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """tsec/before, tsec/after, entropy/clean, egas/* or noise/*, time/attack_s."""


def _vision_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Merged image features [tokens, D] of one image (transformers 5.x returns an output object)."""
    out = model.model.visual(pixel_values.to(model.model.visual.dtype), grid_thw=grid_thw)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _rope_index(model, inputs: dict[str, torch.Tensor], grid_thw: torch.Tensor) -> torch.Tensor:
    """mrope position ids [3, n, L] for n rows that share one image."""
    n = inputs["input_ids"].shape[0]
    kwargs = dict(image_grid_thw=grid_thw.repeat(n, 1), attention_mask=inputs["attention_mask"])
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    return model.model.get_rope_index(inputs["input_ids"], **kwargs)[0]


def _head_entropy(head: torch.nn.Module, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
    """Entropy [N] float32 of head(hidden) for hidden [N, D], chunked; recomputed in backward."""
    parts = []
    for i in range(0, hidden.shape[0], chunk):
        h = hidden[i:i + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(lambda x: token_entropy(head(x)), h, use_reentrant=False))
        else:
            parts.append(token_entropy(head(h)))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def response_entropy(model, inputs: dict[str, torch.Tensor], response_mask: torch.Tensor,
                     pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                     chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token policy entropy of n responses to one image, with the vision tower run once.

    inputs: input_ids, attention_mask, mm_token_type_ids [n, L] int64 (core.policy.
    encode_responses_of_prompt); response_mask [n, L] bool; pixel_values [patches, D] float (may
    require grad); grid_thw [1, 3] int64. Returns (entropy [n, L-1] float32, mask [n, L-1] bool): the
    entropy of the distribution that predicts each response token, zero elsewhere.
    """
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    image = _vision_features(model, pixel_values, grid_thw).to(embeds.dtype)  # [tokens, D]
    image_slots = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image_slots, image.repeat(ids.shape[0], 1))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                        position_ids=_rope_index(model, inputs, grid_thw)).last_hidden_state
    mask = response_mask[:, 1:]
    ent = _head_entropy(model.lm_head, hidden[:, :-1][mask], chunk_tokens)
    return torch.zeros(mask.shape, dtype=torch.float32, device=ent.device).masked_scatter(mask, ent), mask


class Attacker:
    """The adversary's policy copy and the attack; a plain class (the Ray actor is a thin shell)."""

    def __init__(self, policy, processor, config: AdversaryConfig, format_prompt: str = "", seed: int = 0):
        self.policy = policy.eval()
        for p in self.policy.parameters():  # only the pixels get gradients
            p.requires_grad_(False)
        self.processor = processor
        self.config = config
        self.format_prompt = format_prompt
        self.seed = seed

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Take the learner's new weights (full state dict, Hugging Face names); strict."""
        self.policy.load_state_dict({k: v.to(self.device) for k, v in named_tensors.items()}, strict=True)

    def selective_objective(self, prompt: Prompt, responses: list[torch.Tensor], image_u8: np.ndarray):
        """The callable PGD ascends: x [3, H, W] float in [0, 1] -> (selective entropy, metrics)."""
        text = chat_prompt(self.processor, prompt.problem, self.format_prompt)
        inputs, response_mask = encode_responses_of_prompt(self.processor, text, image_u8, responses)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        response_mask = response_mask.to(self.device)
        tsec = self.config.tsec
        seed = self.seed + zlib.crc32(prompt.uid.encode())

        def objective(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            pixel_values, grid = image_to_model_inputs(x.to(self.device), self.processor)
            ent, mask = response_entropy(self.policy, inputs, response_mask, pixel_values, grid,
                                         self.config.chunk_tokens)
            # the same generator state for every evaluation: `random` mode compares like with like
            gen = torch.Generator(device="cpu").manual_seed(seed)
            return selective_entropy(ent.cpu() if ent.device.type != "cpu" else ent, mask.cpu(),
                                     low=tsec.band[0], high=tsec.band[1], scope=tsec.scope, mode=tsec.mode,
                                     generator=gen)

        return objective

    def attack(self, prompt: Prompt, responses: list[torch.Tensor], image_u8: np.ndarray | None = None,
               progress: float = 0.0) -> AttackResult:
        """I_adv for one prompt from its clean responses ([T_i] int64 token ids each).

        kind `pgd`: EgAS on the selective entropy; `noise`: NoisyRollout's Gaussian baseline at the
        step annealed by `progress` in [0, 1]; `none`: the clean image.
        """
        t0 = time.perf_counter()
        image = prompt.image if image_u8 is None else image_u8
        cfg = self.config
        if cfg.kind == "none" or (cfg.kind == "pgd" and not responses):
            return AttackResult(prompt.uid, image.copy(), {"time/attack_s": time.perf_counter() - t0})
        if cfg.kind == "noise":
            t = annealed_noise_step(progress, cfg.noise_t_start, cfg.noise_t_end)
            gen = torch.Generator().manual_seed(self.seed + zlib.crc32(prompt.uid.encode()))
            adv, metrics = noise_perturb(image, t, generator=gen)
            return AttackResult(prompt.uid, adv, {**metrics, "time/attack_s": time.perf_counter() - t0})

        objective = self.selective_objective(prompt, responses, image)
        clean_metrics: dict[str, float] = {}

        def value(x: torch.Tensor) -> torch.Tensor:
            v, m = objective(x)
            if not clean_metrics:  # PGD's first evaluation is at the clean image: no extra forward
                clean_metrics.update(m)
            return v

        adv, metrics = pgd_attack(value, image, step_size=cfg.step_size, steps=cfg.steps, eps=cfg.eps,
                                  device=self.device)
        metrics = {
            **metrics,
            "tsec/before": metrics["egas/objective_before"],
            "tsec/after": metrics["egas/objective_after"],
            "tsec/tokens_kept": clean_metrics["tsec/tokens_kept"],
            "entropy/clean": clean_metrics["tsec/mean_all"],
            "time/attack_s": time.perf_counter() - t0,
        }
        return AttackResult(prompt.uid, adv, metrics)

    def attack_many(self, items: list[tuple[Prompt, list[torch.Tensor]]], progress: float = 0.0) -> list[AttackResult]:
        """Attack several prompts, one after another (each holds its own n1-row batch in memory)."""
        return [self.attack(p, r, progress=progress) for p, r in items]

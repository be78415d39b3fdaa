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

import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from adversary.egas import annealed_noise_step, noise_perturb, pgd_attack
from adversary.pixels import image_to_model_inputs
from adversary.tsec import selective_entropy, token_entropy
from core import weights
from core.batch import Prompt
from core.config import AdversaryConfig
from core.policy import chat_prompt, encode_groups, response_hidden


@dataclass
class AttackResult:
    """The adversarial image of one prompt and what the attack measured."""

    prompt_uid: str
    """`Prompt.uid` of the attacked prompt."""
    image: np.ndarray  # [H, W, 3] uint8, same size as the clean image
    """I_adv (the clean image itself for kind `none`)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """tsec/before, tsec/after, entropy/clean, egas/* or noise/*, time/attack_s."""
    weights_version: int | None = None
    """Version of the weights the attack ran on (set by the AdversaryActor; None in process)."""
    weights_fingerprint: str | None = None
    """core.weights.fingerprint of those weights (None: the folder's, or in process): checked by the driver
    against the learner's with core.members.check_served."""


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


def response_entropy(model, inputs: dict[str, torch.Tensor], pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                     rows_per_image: list[int], head_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token policy entropy of R responses to K images, with the vision tower run once per image.

    inputs: core.policy.encode_groups rows (shared-prefix or one per response) on the model's device;
    pixel_values [patches, D] float of the K images (may require grad); grid_thw [K, 3] int64;
    rows_per_image: as encode_groups returns it. Returns (entropy [R, T] float32, mask [R, T] bool):
    row r holds the entropies of the distributions that predict response r's tokens, left-aligned,
    zero past its end (mask = inputs["response_mask"]).
    """
    hidden = response_hidden(model, inputs, pixel_values, grid_thw, rows_per_image)
    ent = _head_entropy(model.lm_head, hidden, head_chunk)
    mask = inputs["response_mask"]
    return torch.zeros(mask.shape, dtype=torch.float32, device=ent.device).masked_scatter(mask, ent), mask


def _pack(images: list[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Stack [H_k, W_k, 3] uint8 images on one tall canvas [sum H, max W, 3]; returns it and (row, H, W).

    PGD is elementwise, so one run on the canvas is K independent runs: padding gets a zero gradient
    and never moves, and each image's gradient comes only from its own prompt's term.
    """
    width = max(im.shape[1] for im in images)
    canvas = np.zeros((sum(im.shape[0] for im in images), width, 3), dtype=np.uint8)
    places, row = [], 0
    for im in images:
        canvas[row:row + im.shape[0], :im.shape[1]] = im
        places.append((row, im.shape[0], im.shape[1]))
        row += im.shape[0]
    return canvas, places


class Attacker:
    """The adversary's policy copy and the attack; a plain class (the Ray actor is a thin shell)."""

    def __init__(self, policy, processor, config: AdversaryConfig, format_prompt: str = "", seed: int = 0,
                 shared_prefix: bool = True):
        self.policy = policy.eval()
        for p in self.policy.parameters():  # only the pixels get gradients
            p.requires_grad_(False)
        self.processor = processor
        self.config = config
        self.format_prompt = format_prompt
        self.seed = seed
        self.shared_prefix = shared_prefix  # core.policy.encode_groups: each prompt once per row

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Take the learner's new weights (full state dict, Hugging Face names); strict."""
        self.policy.load_state_dict({k: v.to(self.device) for k, v in named_tensors.items()}, strict=True)

    def receive_weights(self, info: weights.GroupInfo, rank: int, own_host: str | None = None) -> tuple[int, str | None]:
        """Take the learner's new weights from a sync of the weight group `info` (as its `rank`; its device
        on `own_host`, this node's address); returns the version and the fingerprint of what arrived. A
        manifest that does not match the policy raises and changes nothing."""
        self._wgroup = weights.join(getattr(self, "_wgroup", None), info, rank, own_host)
        version = weights.receive_into(self._wgroup, self.policy.state_dict()).version
        return version, self._wgroup.last_fingerprint

    def selective_objective(self, items: list[tuple[Prompt, list[torch.Tensor]]],
                            places: list[tuple[int, int, int]]):
        """The callable PGD ascends on the packed canvas, and the per-prompt record of its evaluations.

        objective(x [3, sum H, max W] float in [0, 1]) -> sum over prompts of each prompt's selective
        entropy; one vision forward over all images and one language-model forward over all rows.
        `history` gets one list of (value, metrics) per prompt per evaluation.
        """
        groups = [(chat_prompt(self.processor, p.problem, self.format_prompt), p.image, responses)
                  for p, responses in items]
        encoded, rows_per_image = encode_groups(self.processor, groups, self.shared_prefix)
        inputs = {k: v.to(self.device) for k, v in encoded.items() if k not in ("pixel_values", "image_grid_thw")}
        n_rows = [len(responses) for _, responses in items]
        tsec = self.config.tsec
        seeds = [self.seed + zlib.crc32(p.uid.encode()) for p, _ in items]
        history: list[list[tuple[float, dict[str, float]]]] = []

        def objective(x: torch.Tensor) -> torch.Tensor:
            images = [x[:, r:r + h, :w] for r, h, w in places]
            pixel_values, grid = image_to_model_inputs([im.to(self.device) for im in images], self.processor)
            ent, mask = response_entropy(self.policy, inputs, pixel_values, grid, rows_per_image)
            ent, mask = ent.cpu(), mask.cpu()
            total, record, start = 0.0, [], 0
            for n, seed in zip(n_rows, seeds):
                # the same generator state for every evaluation: `random` mode compares like with like
                gen = torch.Generator(device="cpu").manual_seed(seed)
                value, metrics = selective_entropy(ent[start:start + n], mask[start:start + n], low=tsec.band[0],
                                                   high=tsec.band[1], scope=tsec.scope, mode=tsec.mode,
                                                   generator=gen)
                total = total + value
                record.append((float(value.detach()), metrics))
                start += n
            history.append(record)
            return total

        return objective, history

    def attack(self, prompt: Prompt, responses: list[torch.Tensor], progress: float = 0.0) -> AttackResult:
        """I_adv for one prompt from its clean responses ([T_i] int64 token ids each)."""
        return self.attack_many([(prompt, responses)], progress)[0]

    def attack_many(self, items: list[tuple[Prompt, list[torch.Tensor]]], progress: float = 0.0) -> list[AttackResult]:
        """I_adv for several prompts, batched into forwards of at most `chunk_tokens` response tokens.

        kind `pgd`: EgAS on the selective entropy; `noise`: NoisyRollout's Gaussian baseline at the
        step annealed by `progress` in [0, 1]; `none`: the clean images. Results keep the input order.
        """
        cfg = self.config
        results: dict[int, AttackResult] = {}
        todo = []
        for i, (prompt, responses) in enumerate(items):
            t0 = time.perf_counter()
            if cfg.kind == "none" or (cfg.kind == "pgd" and not responses):
                results[i] = AttackResult(prompt.uid, prompt.image.copy(), {"time/attack_s": 0.0})
            elif cfg.kind == "noise":
                t = annealed_noise_step(progress, cfg.noise_t_start, cfg.noise_t_end)
                gen = torch.Generator().manual_seed(self.seed + zlib.crc32(prompt.uid.encode()))
                adv, metrics = noise_perturb(prompt.image, t, generator=gen)
                results[i] = AttackResult(prompt.uid, adv, {**metrics, "time/attack_s": time.perf_counter() - t0})
            else:
                todo.append(i)
        group: list[int] = []
        budget = 0
        for i in todo + [None]:
            tokens = 0 if i is None else sum(len(r) for r in items[i][1])
            if group and (i is None or budget + tokens > cfg.chunk_tokens):
                results.update(self._pgd_group([items[j] for j in group], group))
                group, budget = [], 0
            if i is not None:
                group.append(i)
                budget += tokens
        return [results[i] for i in range(len(items))]

    def _pgd_group(self, items: list[tuple[Prompt, list[torch.Tensor]]], index: list[int]) -> dict[int, AttackResult]:
        t0 = time.perf_counter()
        cfg = self.config
        canvas, places = _pack([p.image for p, _ in items])
        objective, history = self.selective_objective(items, places)
        adv, metrics = pgd_attack(objective, canvas, step_size=cfg.step_size, steps=cfg.steps, eps=cfg.eps,
                                  device=self.device)
        seconds = (time.perf_counter() - t0) / len(items)
        out = {}
        for k, ((prompt, _), (r, h, w)) in enumerate(zip(items, places)):
            image = adv[r:r + h, :w].copy()
            diff = np.abs(image.astype(np.int16) - prompt.image.astype(np.int16))
            (before, clean), (after, _) = history[0][k], history[-1][k]
            out[index[k]] = AttackResult(prompt.uid, image, {
                "tsec/before": before,
                "tsec/after": after,
                "tsec/tokens_kept": clean["tsec/tokens_kept"],
                "entropy/clean": clean["tsec/mean_all"],
                "egas/linf": float(diff.max()) / 255.0,
                "egas/changed_frac": float((diff > 0).mean()),
                "egas/steps": metrics["egas/steps"],
                "egas/batch_prompts": float(len(items)),
                "time/attack_s": seconds,
            })
        return out

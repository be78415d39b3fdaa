"""The module a learner rank trains: the policy wrapped so that its forward scores response tokens only.

FSDP2 wraps `Scorer` as its root; the language-model head runs in row chunks recomputed in backward
(`head_logprobs`), so a micro-batch never holds the full [tokens, vocab] logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from core.policy import response_hidden

PREFIX = "policy."  # the state-dict prefix `Scorer` adds; exported and saved names have none


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) [N] float32 (with gradient) and entropy [N] float32 (detached) of head(hidden).

    hidden [N, D], targets [N] int64. Chunks of `chunk` rows, recomputed in backward, so at most one
    [chunk, V] block of logits is alive at a time instead of [N, V].
    """
    def part(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float()  # [n, V] float32
        lse = logits.logsumexp(-1)
        logp = logits.gather(-1, t[:, None]).squeeze(-1) - lse
        with torch.no_grad():
            entropy = lse - (logits.softmax(-1) * logits).sum(-1)
        return logp, entropy

    logps, ents = [], []
    for i in range(0, hidden.shape[0], chunk):
        h, t = hidden[i:i + chunk], targets[i:i + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(part, h, t, use_reentrant=False)
        else:
            lp, ent = part(h, t)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(ents)


class Scorer(torch.nn.Module):
    """The root module FSDP2 wraps: the policy, and a forward that scores response tokens only.

    Calling submodules of an FSDP2 model from outside skips the root's all-gather, so the scoring
    forward (shared vision tower, chunked head) has to be this module's own `forward`.
    """

    def __init__(self, policy: torch.nn.Module, head_chunk: int):
        super().__init__()
        self.policy = policy
        self.head_chunk = head_chunk

    def forward(self, inputs: dict[str, torch.Tensor],  # core.policy.encode_groups rows (packed or not)
                pixel_values: torch.Tensor,  # [patches, D] float, one copy per image
                image_grid_thw: torch.Tensor,  # [K, 3] int64
                rows_per_image: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies) [n_response_tokens] float32, response-major (inputs["response_mask"])."""
        hidden = response_hidden(self.policy, inputs, pixel_values, image_grid_thw, rows_per_image)
        return head_logprobs(self.policy.lm_head, hidden, inputs["targets"], self.head_chunk)

"""TsEC: token-selective entropy, the objective the SaEI adversary ascends.

For the n1 clean responses of one prompt, the policy's full-vocabulary entropy is taken at every
response position (teacher-forced). Those per-token entropies are ranked, the lowest third and the
highest third are dropped, and the mean of the middle third is the *selective entropy*. The lowest
third are near-deterministic tokens (format, copied numbers) that a perturbation cannot move without
breaking the answer; the highest third are already-uncertain forks. The middle band is where a small
image perturbation can widen exploration, so EgAS runs PGD on the pixels to *raise* this value.

Everything here is pure torch and device-agnostic:

- ``token_entropy``: ``[..., V]`` logits -> ``[...]`` entropy, float32 whatever the logits' dtype,
  upcast in chunks so a 150k vocabulary never lives in float32 all at once, with a hand-written
  backward that recomputes per chunk instead of keeping float32 activations for the whole batch.
- ``band_mask``: which valid tokens the selection keeps (the band, or the ablations ``all``,
  ``random``, ``top``, ``bottom``), per response (``sequence``) or over the whole group (``group``).
- ``selective_entropy``: the token-mean of the entropy over the kept tokens, differentiable, with
  metrics.

Rank boundaries use round-half-up, ``floor(x + 0.5)``, not Python's round-half-even ``round``: a
band edge that lands on a half rank always moves the same way, whatever the parity of n.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

SCOPES = ("sequence", "group")
MODES = ("band", "all", "random", "top", "bottom")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64 so gradcheck and float64 references are meaningful; everything
    # narrower (bf16, fp16, fp32) is computed and returned in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shifted_logits(chunk: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # chunk: [n, V] any float dtype -> z [n, V] dtype (max-shifted, so z <= 0), lse [n] dtype
    z = chunk.to(dtype) - chunk.amax(dim=-1, keepdim=True).to(dtype)
    # Masked vocabulary entries (logit -inf, e.g. image-pad tokens) have p = 0 exactly; a finite
    # stand-in keeps p * z = 0 in forward and backward instead of 0 * inf = nan.
    z.clamp_(min=torch.finfo(dtype).min)
    lse = z.exp().sum(-1).log()
    return z, lse


class _ChunkedEntropy(torch.autograd.Function):
    """H = lse(z) - sum_v p_v z_v per row (z max-shifted), with dH/dz_v = -p_v (log p_v + H).

    This is -sum p log p rearranged so both terms are non-negative (no cancellation) and a uniform
    distribution gives exactly the float32 log V. Plain autograd through the chunks would save
    float32 p and log p for every position, i.e. the whole [N, V] in float32, which is exactly
    what chunking is meant to avoid; here only the input logits (alive anyway, in their own
    dtype) and H are kept, and backward recomputes one chunk at a time.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
        # logits: [N, V] float (bf16/fp16/fp32/fp64) -> [N] float32 (float64 for float64 input)
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        for start in range(0, logits.shape[0], chunk_size):
            z, lse = _shifted_logits(logits[start : start + chunk_size], dtype)
            p = (z - lse[:, None]).exp_()
            out[start : start + chunk_size] = lse - p.mul_(z).sum(-1)
        ctx.save_for_backward(logits, out)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        # grad_out: [N] float32/float64 -> grad of logits [N, V] in the logits' dtype
        logits, entropy = ctx.saved_tensors
        dtype = entropy.dtype
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            z, lse = _shifted_logits(logits[start:stop], dtype)
            p = (z - lse[:, None]).exp_()
            # log p + H = z - (lse - H); reuse z's buffer for it
            g = z.sub_((lse - entropy[start:stop])[:, None]).mul_(p).mul_(grad_out[start:stop, None].neg())
            grad[start:stop] = g
        return grad, None


def token_entropy(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Full-vocabulary entropy of each position's next-token distribution.

    logits: [B, L, V] or [N, V] (any [..., V]) float, bf16/fp16/fp32/fp64.
    Returns [B, L] / [N] float32 (float64 only for float64 logits). At most ``chunk_size``
    positions are upcast to float32 at a time, in forward and in backward. Differentiable
    (first order) with respect to the logits.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating tensor [..., V], got {logits.dtype} {tuple(logits.shape)}"
        )
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])  # [N, V]
    return _ChunkedEntropy.apply(flat, chunk_size).reshape(lead)


def _check_selection(low: float, high: float, scope: str, mode: str) -> None:
    if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low < high <= 1.0):
        raise ValueError(f"band must satisfy 0 <= low < high <= 1, got low={low!r} high={high!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_pair(entropy: torch.Tensor, mask: torch.Tensor) -> None:
    if entropy.dim() != 2 or mask.shape != entropy.shape:
        raise ValueError(
            f"entropy and mask must both be [B, L], got {tuple(entropy.shape)} and {tuple(mask.shape)}"
        )


def _valid_first_ranks(key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # key: [R, L] float, valid: [R, L] bool -> [R, L] int64 rank of each position in its row.
    # Order is (invalid last, key ascending, position ascending): two stable sorts give that
    # lexicographic order, and invalid entries never interleave with valid ones even when a valid
    # key is +inf or nan. Invalid keys are zeroed first so their garbage cannot matter.
    key = torch.where(valid, key, torch.zeros((), dtype=key.dtype, device=key.device))
    order = torch.sort(key, dim=-1, stable=True).indices
    invalid_sorted = (~valid).gather(-1, order).to(torch.uint8)
    order = order.gather(-1, torch.sort(invalid_sorted, dim=-1, stable=True).indices)
    positions = torch.arange(key.shape[-1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def band_mask(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    low: float = 1 / 3,
    high: float = 2 / 3,
    scope: str = "sequence",
    mode: str = "band",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Which tokens the selective entropy averages over.

    entropy: [B, L] float, per-token entropy (may require grad; the selection is not differentiated).
    mask:    [B, L] bool, valid response tokens. Masked positions are never selected, whatever
             their entropy value (nan/inf padding included).
    Returns [B, L] bool.

    Per row (scope ``sequence``) or over all rows flattened row-major (scope ``group``), the n valid
    tokens are ranked by entropy ascending, ties by position (earlier first). The band keeps ranks
    ``floor(low*n + 0.5) <= r < floor(high*n + 0.5)`` (round-half-up); if that is empty and n >= 1,
    the median-ranked token (rank (n-1)//2) is kept instead. With k the band's count:
    ``all`` keeps every valid token (EgAS without TsEC), ``top`` the k highest (ties: later
    positions), ``bottom`` the k lowest, ``random`` k valid tokens uniformly at random drawn from
    ``generator`` (the global RNG if None).
    """
    _check_selection(low, high, scope, mode)
    _check_pair(entropy, mask)
    valid = mask.to(device=entropy.device, dtype=torch.bool)
    if mode == "all":
        return valid.clone()

    rows = valid.reshape(1, -1) if scope == "group" else valid  # [R, L'] bool
    n = rows.sum(-1)  # [R] int64
    # float64 products match Python's float arithmetic, so floor(x + 0.5) here is math.floor(x + 0.5).
    n64 = n.to(torch.float64)
    lo = torch.floor(n64 * low + 0.5).long()
    hi = torch.floor(n64 * high + 0.5).long()
    empty = (hi <= lo) & (n > 0)
    median = torch.div(n - 1, 2, rounding_mode="floor")
    lo = torch.where(empty, median, lo)
    hi = torch.where(empty, median + 1, hi)
    k = hi - lo

    if mode == "band":
        start, stop = lo, hi
    elif mode == "top":
        start, stop = n - k, n
    else:  # bottom, random: the first k of an ordering
        start, stop = torch.zeros_like(k), k

    if mode == "random":
        device = generator.device if generator is not None else entropy.device
        key = torch.rand(rows.shape, generator=generator, device=device).to(entropy.device)
    else:
        key = entropy.detach().reshape(rows.shape)
    rank = _valid_first_ranks(key, rows)
    keep = rows & (rank >= start[:, None]) & (rank < stop[:, None])
    return keep.reshape(entropy.shape)


def selective_entropy(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    low: float = 1 / 3,
    high: float = 2 / 3,
    scope: str = "sequence",
    mode: str = "band",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean of the entropy over the tokens ``band_mask`` keeps: the TsEC objective.

    entropy: [B, L] float, per-token entropy (typically from ``token_entropy``, requiring grad).
    mask:    [B, L] bool, valid response tokens.
    Returns a scalar float32 (float64 for float64 entropy) = sum over kept / number kept, pooled over
    the whole batch (long responses weigh more, as in a token-mean loss); its gradient is 1/k on each
    kept token and exactly 0 elsewhere. With nothing kept the value is a zero that still carries
    the graph, so a caller's backward() does not fail on an empty batch. Metrics (python floats):
    ``tsec/tokens_kept``, ``tsec/tokens_valid``, ``tsec/band_low`` / ``tsec/band_high`` (min / max
    kept entropy, 0 if none), ``tsec/mean_all`` (mean over all valid tokens, 0 if none).
    """
    keep = band_mask(entropy, mask, low, high, scope, mode, generator)  # [B, L] bool
    valid = mask.to(device=entropy.device, dtype=torch.bool)
    values = entropy.to(_compute_dtype(entropy.dtype))  # [B, L] float32/float64
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # where, not multiply: padding may hold nan/inf, and 0 * nan would poison the sum and its grad.
    kept_count = keep.sum()
    value = torch.where(keep, values, zero).sum() / kept_count.clamp(min=1).to(values.dtype)

    with torch.no_grad():
        v = values.detach()
        valid_count = valid.sum()
        inf = torch.tensor(math.inf, dtype=v.dtype, device=v.device)
        has_kept = kept_count > 0
        band_low = torch.where(has_kept, torch.where(keep, v, inf).min(), zero)
        band_high = torch.where(has_kept, torch.where(keep, v, -inf).max(), zero)
        mean_all = torch.where(valid, v, zero).sum() / valid_count.clamp(min=1).to(v.dtype)
        # One device sync for all metrics.
        stats = torch.stack(
            [kept_count.to(v.dtype), valid_count.to(v.dtype), band_low, band_high, mean_all]
        ).tolist()
    metrics = dict(
        zip(
            ("tsec/tokens_kept", "tsec/tokens_valid", "tsec/band_low", "tsec/band_high", "tsec/mean_all"),
            (float(s) for s in stats),
        )
    )
    return value, metrics

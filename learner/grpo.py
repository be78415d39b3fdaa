"""GRPO math: group-relative advantages and the token-level policy loss.

Pure tensor functions, no ray / project imports, so they run unchanged in unit tests and inside the
FSDP learner. Loss functions return ``(value, metrics)`` with metrics as python floats.

``policy_loss`` reads as the math: ratios, then one per-token loss piece per mode (``clip_losses``,
``kl_cov_losses``, ``clip_cov_losses``, each returning ``(per-token losses, metrics)``), then the
aggregation and the KL penalty. The two covariance-based variants follow the Entropy-Mechanism-of-RL
paper (arXiv 2505.22617) as implemented in verl (``verl/trainer/ppo/core_algos.py``:
``compute_policy_loss_kl_cov`` and ``compute_policy_loss_clip_cov``); each piece names the function it
mirrors and the few places where we differ.
"""

from __future__ import annotations

import torch

_SCALES = ("std", "none")
_AGGREGATIONS = ("token-mean", "seq-mean-token-mean")
_MODES = ("clip", "kl_cov", "clip_cov")


def group_advantages(
    rewards: torch.Tensor,  # [N] float
    group_ids: torch.Tensor,  # [N] int64, arbitrary labels (not necessarily contiguous or sorted)
    eps: float = 1e-6,
    scale: str = "std",
) -> torch.Tensor:  # [N] float32
    """Group-normalised advantages: ``(r - mean_g) / (std_g + eps)`` (GRPO) or ``r - mean_g`` (Dr. GRPO).

    std is the unbiased (correction=1) std of each group, matching ``torch.std`` as verl's
    ``compute_grpo_outcome_advantage`` uses it. A group of size 1 or with zero spread carries no
    learning signal, so its advantages are exactly 0 rather than ``(r - mean) / eps`` noise.
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if rewards.dim() != 1 or group_ids.dim() != 1 or rewards.shape[0] != group_ids.shape[0]:
        raise ValueError(
            f"rewards and group_ids must be 1-D of equal length, got {tuple(rewards.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=rewards.device)

    # float64 so that rewards of very different magnitude do not lose the within-group spread.
    r = rewards.detach().to(torch.float64)  # [N] float64
    _, inv = torch.unique(group_ids, return_inverse=True)  # inv: [N] int64 in [0, G)
    n_groups = int(inv.max().item()) + 1
    count = torch.bincount(inv, minlength=n_groups).to(torch.float64)  # [G] float64
    mean = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, r) / count
    centred = r - mean[inv]  # [N] float64

    # Zero spread is decided on max == min, not on the computed std: the two-pass mean of equal
    # values can be off by an ulp (0.1 * 3 / 3 != 0.1), which would otherwise leak ~1e-11 advantages.
    g_max = torch.full((n_groups,), -torch.inf, dtype=torch.float64, device=r.device)
    g_min = torch.full((n_groups,), torch.inf, dtype=torch.float64, device=r.device)
    g_max = g_max.scatter_reduce(0, inv, r, reduce="amax")
    g_min = g_min.scatter_reduce(0, inv, r, reduce="amin")
    degenerate = (count < 2) | (g_max == g_min)  # [G] bool

    if scale == "std":
        sq = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, centred**2)
        std = torch.sqrt(sq / (count - 1).clamp(min=1.0))  # [G] float64, unbiased
        adv = centred / (std[inv] + eps)
    else:
        adv = centred
    adv = torch.where(degenerate[inv], torch.zeros_like(adv), adv)
    return adv.to(torch.float32)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # x: [B, L] float, mask: [B, L] bool. Divides by the true count (verl's masked_mean adds 1e-8 to
    # the denominator instead); clamp keeps an all-padding batch at 0 instead of nan.
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def _k3(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    # ref_logprobs, logprobs: [B, L] float -> [B, L] float.
    # k3 (Schulman's low-variance, always >= 0) estimator of KL(pi || pi_ref), with the same clamps as
    # verl's kl_penalty("low_var_kl") so one wild token cannot blow up the loss.
    log_ratio = (ref_logprobs - logprobs).clamp(min=-20.0, max=20.0)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(min=-10.0, max=10.0)


def _aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    # loss_mat: [B, L] float, mask: [B, L] bool -> scalar.
    # torch.where, not multiplication: nan * 0 is nan, and padding may hold garbage.
    masked = torch.where(mask, loss_mat, torch.zeros_like(loss_mat))
    if aggregation == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    tokens = mask.sum(dim=-1)  # [B] int64
    seq_mean = masked.sum(dim=-1) / tokens.clamp(min=1)  # [B] float
    # Sequences without a valid token are dropped rather than counted as a zero loss.
    has_tokens = tokens > 0
    return torch.where(has_tokens, seq_mean, torch.zeros_like(seq_mean)).sum() / has_tokens.sum().clamp(min=1)


def _check_policy_loss_args(
    logprobs: torch.Tensor,  # [B, L] float
    old_logprobs: torch.Tensor,  # [B, L] float
    advantages: torch.Tensor,  # [B] or [B, L] float
    mask: torch.Tensor,  # [B, L] bool
    ref_logprobs: torch.Tensor | None,  # [B, L] float
    clip_low: float, clip_high: float, aggregation: str, mode: str, kl_cov_frac: float, clip_cov_frac: float,
) -> None:
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, L], got {tuple(logprobs.shape)}")
    shape = logprobs.shape
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(f"advantages must be [B] or [B, L] for {tuple(shape)}, got {tuple(advantages.shape)}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError("clip_low and clip_high must be >= 0")
    if mode == "kl_cov" and kl_cov_frac <= 0:
        raise ValueError("kl_cov_frac must be > 0")  # verl asserts the same
    if mode == "clip_cov" and clip_cov_frac <= 0:
        raise ValueError("clip_cov_frac must be > 0")  # verl asserts the same


def _valid_only(
    logprobs: torch.Tensor,  # [B, L] float, requires grad
    old_logprobs: torch.Tensor,  # [B, L] float
    advantages: torch.Tensor,  # [B] or [B, L] float
    mask: torch.Tensor,  # [B, L] bool (or 0/1)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, old, adv, mask): [B, L] in float32 or wider, exactly 0 off the mask; the bool mask.

    Only logp keeps a gradient. Padding may hold nan/inf; replacing it up front keeps it out of every
    reduction and out of the backward pass (where() routes a zero gradient to the unselected branch).
    """
    # bf16 log-probs would make exp(logp - old) too coarse to clip meaningfully.
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    mask = mask.to(device=logprobs.device, dtype=torch.bool)  # [B, L] bool
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    logp = torch.where(mask, logprobs.to(dtype), zero)  # [B, L] dtype, carries the gradient
    old = torch.where(mask, old_logprobs.detach().to(dtype), zero)  # [B, L] dtype
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv[:, None].expand(logprobs.shape)
    adv = torch.where(mask, adv, zero)  # [B, L] dtype
    return logp, old, adv, mask


def clip_losses(
    pg_unclipped: torch.Tensor,  # [B, L] float, -r A
    pg_clipped: torch.Tensor,  # [B, L] float, -clip(r, 1 - clip_low, 1 + clip_high) A
    clip_active: torch.Tensor,  # [B, L] bool, the clipped term is the larger one (valid tokens only)
    mask: torch.Tensor,  # [B, L] bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's per-token ``max(-r A, -clip(r) A)`` [B, L], without dual-clip (verl's
    ``compute_policy_loss_vanilla`` minus its ``clip_ratio_c`` branch); metrics: ``clip_frac``."""
    return torch.maximum(pg_unclipped, pg_clipped), {
        "actor/clip_frac": _masked_mean(clip_active.to(pg_unclipped.dtype), mask).item()}


def kl_cov_losses(
    pg_unclipped: torch.Tensor,  # [B, L] float, -r A (carries the gradient)
    log_ratio: torch.Tensor,  # [B, L] float, logp - old (carries the gradient)
    adv: torch.Tensor,  # [B, L] float, 0 off the mask
    logp: torch.Tensor,  # [B, L] float, detached, 0 off the mask
    mask: torch.Tensor,  # [B, L] bool
    frac: float,
    coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's ``compute_policy_loss_kl_cov`` per token [B, L]: ``-r A``, NO ratio clipping anywhere, plus
    ``coef * |logp - old|`` on the top ``max(1, int(n_valid * frac))`` valid tokens by
    ``cov(A, logp) = (A - mean A) (logp - mean logp)`` (means over valid tokens): that restrains exactly
    the tokens whose confident, rewarded updates drive entropy collapse.

    metrics: ``cov_frac`` (share of valid tokens penalised), ``ppo_kl_abs``, ``clip_frac`` (0: verl
    reports 0 too).
    """
    selected = torch.zeros_like(mask)  # [B, L] bool
    pg_losses = pg_unclipped
    n_valid = int(mask.sum().item())
    if n_valid > 0:
        flat_idx = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]  # [n_valid] int64
        v_adv = adv.reshape(-1)[flat_idx]
        v_logp = logp.reshape(-1)[flat_idx]
        cov = (v_adv - v_adv.mean()) * (v_logp - v_logp.mean())  # [n_valid] float
        top = torch.topk(cov, max(1, int(n_valid * frac)), largest=True).indices
        selected = selected.reshape(-1).index_fill(0, flat_idx[top], True).reshape(mask.shape)
        pg_losses = torch.where(selected, pg_unclipped + coef * log_ratio.abs(), pg_unclipped)
    dtype = pg_unclipped.dtype
    return pg_losses, {
        "actor/clip_frac": 0.0,
        "actor/cov_frac": _masked_mean(selected.to(dtype), mask).item(),
        "actor/ppo_kl_abs": _masked_mean(log_ratio.detach().abs(), mask).item(),
    }


def clip_cov_losses(
    pg_unclipped: torch.Tensor,  # [B, L] float, -r A
    pg_clipped: torch.Tensor,  # [B, L] float, -clip(r) A
    clip_active: torch.Tensor,  # [B, L] bool, ratio-clipped valid tokens
    adv: torch.Tensor,  # [B, L] float, 0 off the mask
    logp: torch.Tensor,  # [B, L] float, detached, 0 off the mask
    mask: torch.Tensor,  # [B, L] bool
    frac: float,
    bounds: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's ``compute_policy_loss_clip_cov`` per token [B, L]: the PPO clipped loss, except that a random
    ``max(1, int(frac * n_valid))`` of the candidates (valid, not ratio-clipped, ``lb < cov(A, logp) < ub``,
    the band open as in verl) get their loss multiplied by 0 (verl's ``corr``), which drops both their
    value and their gradient. verl's clip_cov also has no dual-clip.

    metrics: ``cov_frac`` (share of valid tokens dropped), ``clip_frac``.
    """
    lb, ub = bounds
    selected = torch.zeros_like(mask)  # [B, L] bool
    cov = (adv - _masked_mean(adv, mask)) * (logp - _masked_mean(logp, mask))  # [B, L] float
    eligible = mask & ~clip_active & (cov > lb) & (cov < ub)  # verl: cov := -inf on these, then > lb
    cand = torch.nonzero(eligible)  # [C, 2] int64, row-major like verl
    if len(cand) > 0:
        clip_num = max(int(frac * int(mask.sum().item())), 1)
        # verl uses the global RNG; an explicit generator makes the draw reproducible per rank.
        perm = torch.randperm(len(cand), generator=generator, device="cpu").to(cand.device)
        pick = cand[perm[: min(clip_num, len(cand))]]
        selected = selected.index_put((pick[:, 0], pick[:, 1]), torch.tensor(True, device=mask.device))
    dtype = pg_unclipped.dtype
    zero = torch.zeros((), dtype=dtype, device=pg_unclipped.device)
    pg_losses = torch.where(selected, zero, torch.maximum(pg_unclipped, pg_clipped))
    return pg_losses, {
        "actor/clip_frac": _masked_mean(clip_active.to(dtype), mask).item(),
        # verl's clip_cov reports this as pg_clipfrac; kept apart so clip_frac means one thing.
        "actor/cov_frac": _masked_mean(selected.to(dtype), mask).item(),
    }


def _ratio_metrics(
    ratio: torch.Tensor,  # [B, L] float, pi / pi_old
    log_ratio: torch.Tensor,  # [B, L] float, 0 off the mask
    mask: torch.Tensor,  # [B, L] bool
) -> dict[str, float]:
    with torch.no_grad():
        r_valid = ratio[mask]  # [n_valid]
        some = r_valid.numel() > 0
        return {
            # k1 estimate E[old - new] over valid tokens, verl's ppo_kl.
            "actor/approx_kl": _masked_mean(-log_ratio, mask).item(),
            "actor/ratio_mean": r_valid.mean().item() if some else 0.0,
            "actor/ratio_max": r_valid.max().item() if some else 0.0,
            "actor/ratio_min": r_valid.min().item() if some else 0.0,
        }


def policy_loss(
    logprobs: torch.Tensor,  # [B, L] float, current policy, requires grad
    old_logprobs: torch.Tensor,  # [B, L] float, behaviour (old) policy
    advantages: torch.Tensor,  # [B] or [B, L] float; [B] is broadcast over the sequence
    mask: torch.Tensor,  # [B, L] bool, True on response tokens that count
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token-mean",
    ref_logprobs: torch.Tensor | None = None,  # [B, L] float, reference policy
    kl_coef: float = 0.0,
    mode: str = "clip",
    kl_cov_frac: float = 0.002,
    kl_cov_coef: float = 1.0,
    clip_cov_frac: float = 0.0002,
    clip_cov_bounds: tuple[float, float] = (1.0, 5.0),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO policy loss; returns ``(scalar loss, metrics)``.

    mode ``clip``: PPO clipped surrogate ``-min(r A, clip(r, 1-clip_low, 1+clip_high) A)`` (clip_losses).
    mode ``kl_cov`` / ``clip_cov``: verl's Entropy-Mechanism variants (kl_cov_losses, clip_cov_losses).

    With ``ref_logprobs`` and ``kl_coef > 0`` the k3 KL to the reference is added per token before
    aggregation, as GRPO does; since both parts are aggregated with the same mask and mode this equals
    verl's ``pg_loss + kl_coef * kl_loss``. Gradients reach ``logprobs`` only.
    """
    _check_policy_loss_args(logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high,
                            aggregation, mode, kl_cov_frac, clip_cov_frac)
    logp, old, adv, mask = _valid_only(logprobs, old_logprobs, advantages, mask)  # [B, L] each

    log_ratio = logp - old  # [B, L]
    ratio = torch.exp(log_ratio)  # [B, L] r = pi / pi_old
    pg_unclipped = -adv * ratio  # [B, L] -r A
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, L] -clip(r) A
    clip_active = (pg_clipped > pg_unclipped) & mask  # [B, L] bool, verl's pg_clipfrac criterion

    if mode == "clip":
        pg_losses, metrics = clip_losses(pg_unclipped, pg_clipped, clip_active, mask)
    elif mode == "kl_cov":
        pg_losses, metrics = kl_cov_losses(pg_unclipped, log_ratio, adv, logp.detach(), mask, kl_cov_frac,
                                           kl_cov_coef)
    else:
        pg_losses, metrics = clip_cov_losses(pg_unclipped, pg_clipped, clip_active, adv, logp.detach(), mask,
                                             clip_cov_frac, clip_cov_bounds, generator)

    pg_loss = _aggregate(pg_losses, mask, aggregation)
    loss = pg_loss
    if ref_logprobs is not None:
        ref = torch.where(mask, ref_logprobs.detach().to(logp.dtype), torch.zeros_like(logp.detach()))  # [B, L]
        kl = _k3(ref, logp)  # [B, L]
        if kl_coef > 0:
            loss = _aggregate(pg_losses + kl_coef * kl, mask, aggregation)
        metrics["actor/kl_ref"] = _masked_mean(kl.detach(), mask).item()
    metrics["actor/pg_loss"] = pg_loss.item()
    metrics.update(_ratio_metrics(ratio, log_ratio, mask))
    return loss, metrics

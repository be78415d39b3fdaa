"""EgAS: entropy-guided adversarial sampling by PGD on raw pixels, and the Gaussian-noise baseline.

`pgd_attack` ascends an objective (the selective entropy, built by the caller from the policy and
adversary.pixels.image_to_model_inputs) with signed-gradient steps inside an L-infinity ball:

    x <- clip(x + a * sign(grad), x0 - eps, x0 + eps) ∩ [0, 1]

`noise_perturb` is NoisyRollout's baseline: a DDPM forward-noising step on the image.

Both take and return ``[H, W, 3]`` uint8 images, so the result goes to the rollout engine as an
ordinary image. Pure torch; the objective decides which device the model runs on.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from adversary.pixels import to_float_image

__all__ = ["annealed_noise_step", "noise_perturb", "pgd_attack", "sigmoid_beta_schedule"]

_LEVELS = 255  # uint8 levels per unit of the [0, 1] image
_MULTIPLE_TOL = 1e-6  # |v * 255 - round(v * 255)| under this counts as a multiple of 1/255
_EXACT_TOL = 1e-4  # the float image times 255 must be this close to integers before conversion


def _as_uint8_hwc(image_u8) -> np.ndarray:
    arr = image_u8.detach().cpu().numpy() if isinstance(image_u8, torch.Tensor) else np.asarray(image_u8)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {arr.dtype}")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W, 3], got shape {arr.shape}")
    return np.array(arr, copy=True)  # writable: images from Ray's object store are read-only


def _in_levels(value: float) -> tuple[float, bool]:
    """``value`` (in [0, 1] units) in uint8 levels, and whether it is a whole number of levels."""
    levels = float(value) * _LEVELS
    nearest = round(levels)
    if abs(levels - nearest) <= _MULTIPLE_TOL:
        return float(nearest), True
    return levels, False


def _scalar(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(f"the objective must return a scalar tensor, got {what}: {type(value).__name__}"
                         + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""))
    return value.reshape(())


def _levels_to_float(levels: torch.Tensor) -> torch.Tensor:
    # float32 levels / 255 is the same float as to_float_image of that uint8 value
    return levels.to(torch.float32) / _LEVELS


def pgd_attack(objective: Callable[[torch.Tensor], torch.Tensor], image_u8, step_size: float = 2 / 255,
               steps: int = 1, eps: float | None = None, device: str | torch.device | None = None,
               ) -> tuple[np.ndarray, dict[str, float]]:
    """Signed-gradient ascent of ``objective`` on the image; returns ``(adversarial uint8 [H, W, 3], metrics)``.

    ``objective(x)`` takes ``x`` float32 ``[3, H, W]`` in [0, 1] (requires grad; built on ``device``,
    CPU by default) and returns a scalar tensor to be *ascended*. Each of the ``steps`` steps does
    ``x <- clip(x + step_size * sign(grad), x0 - eps, x0 + eps)`` then clips to [0, 1]; ``eps``
    defaults to ``step_size * steps``. A zero (or NaN) gradient entry leaves that pixel unchanged.

    Exactness. The iterate is kept in uint8 *levels* (``x_lv = 255 * x``, values 0..255 held as
    float64) and steps/eps in levels too; ``x = x_lv / 255`` is formed only to call the objective.
    With ``step_size`` and ``eps`` multiples of 1/255 every update and clip is integer arithmetic,
    which floating point does exactly, so the iterate never drifts off the uint8 grid (stepping in
    [0, 1] units would add the rounding error of 2/255 at every step), and ``x`` is bit-identical to
    ``to_float_image`` of the uint8 image the engine will see. This is asserted before conversion.
    Otherwise the result is rounded to the nearest uint8 at the end and ``egas/rounded`` is 1; the
    rounding can move a pixel by up to half a level, so ``egas/linf`` may then exceed ``eps`` by up
    to 0.5/255.

    Metrics (python floats): ``egas/objective_before`` (at x0), ``egas/objective_after`` (one extra
    no-grad forward on the returned uint8 image), ``egas/linf`` (max abs change, [0, 1] units),
    ``egas/changed_frac`` (fraction of pixel channel values changed), ``egas/steps``,
    ``egas/rounded`` (0/1), ``egas/nonfinite_grad`` (gradient entries that were NaN, treated as 0).
    """
    steps, eps = _check_pgd_args(steps, step_size, eps)
    u8 = _as_uint8_hwc(image_u8)
    dev = torch.device(device) if device is not None else torch.device("cpu")

    step_lv, step_exact = _in_levels(step_size)
    eps_lv, eps_exact = _in_levels(eps)
    exact = step_exact and eps_exact

    x0_lv = torch.from_numpy(u8).to(dev).permute(2, 0, 1).to(torch.float64)  # [3, H, W], 0..255
    lo = (x0_lv - eps_lv).clamp_(min=0.0)
    hi = (x0_lv + eps_lv).clamp_(max=float(_LEVELS))
    x_lv = x0_lv.clone()

    before = None
    nonfinite = 0
    for _ in range(steps):
        x = _levels_to_float(x_lv).requires_grad_(True)
        value = _scalar(objective(x), "objective(x)")
        if before is None:
            before = float(value.detach())
        grad = torch.autograd.grad(value, x, allow_unused=True)[0] if value.requires_grad else None
        if grad is None:  # the objective does not depend on x: no pixel moves
            break
        grad = grad.detach()
        bad = torch.isnan(grad)  # counted here: what sign(NaN) gives is backend-dependent
        direction = torch.sign(grad).to(torch.float64)
        nonfinite += int(bad.sum())
        direction = direction.masked_fill(bad, 0.0)
        x_lv = torch.minimum(torch.maximum(x_lv + step_lv * direction, lo), hi)
    if before is None:
        with torch.no_grad():
            before = float(_scalar(objective(_levels_to_float(x0_lv)), "objective(x0)"))

    if exact:
        _check_on_grid(_levels_to_float(x_lv))
    adv_lv = torch.round(x_lv).clamp_(0, _LEVELS)
    adv_u8 = adv_lv.to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()

    with torch.no_grad():
        after = float(_scalar(objective(to_float_image(adv_u8).to(dev)), "objective(x_adv)"))
    change = (adv_lv - x0_lv).abs()
    return adv_u8, {
        "egas/objective_before": before,
        "egas/objective_after": after,
        "egas/linf": float(change.max()) / _LEVELS if change.numel() else 0.0,
        "egas/changed_frac": float((change > 0).to(torch.float64).mean()) if change.numel() else 0.0,
        "egas/steps": float(steps),
        "egas/rounded": 0.0 if exact else 1.0,
        "egas/nonfinite_grad": float(nonfinite),
    }


def _check_pgd_args(steps, step_size: float, eps: float | None) -> tuple[int, float]:
    """(steps as int, eps with its default step_size * steps), or ValueError for a bad argument."""
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    steps = int(steps)
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be positive and finite, got {step_size!r}")
    if eps is None:
        eps = step_size * steps
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be non-negative and finite, got {eps!r}")
    return steps, eps


def _check_on_grid(x: torch.Tensor) -> None:
    """x [3, H, W] float32 in [0, 1] must be k/255 for integers k (the exact-step guarantee)."""
    x = x.to(torch.float64) * _LEVELS
    off = float((x - torch.round(x)).abs().max()) if x.numel() else 0.0
    if off > _EXACT_TOL:
        raise AssertionError(f"PGD iterate left the uint8 grid (max offset {off:.3g} levels) "
                             "although step and eps are multiples of 1/255")


def sigmoid_beta_schedule(T: int = 1000, beta_start: float = 1e-5, beta_end: float = 5e-3,
                          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """DDPM sigmoid beta schedule as NoisyRollout uses it: ``sigmoid(linspace(-6, 6, T)) * (end - start) + start``."""
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=dtype)) * (beta_end - beta_start) + beta_start


def _alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1 - betas.to(torch.float64), dim=0)


def noise_perturb(image_u8, t: int, schedule: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """NoisyRollout's Gaussian baseline: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``, noise ~ N(0, 1).

    ``x0`` is the image in [0, 1]; the result is clipped to [0, 1] and rounded to uint8.
    ``schedule`` is the betas (default `sigmoid_beta_schedule()`), ``abar = cumprod(1 - betas)``;
    ``t`` is a step in ``[0, len(schedule))``. ``generator`` (a CPU torch.Generator) makes the noise
    reproducible. Metrics: ``noise/t``, ``noise/abar``, ``noise/linf`` ([0, 1] units).
    """
    betas = sigmoid_beta_schedule() if schedule is None else torch.as_tensor(schedule)
    if betas.dim() != 1 or betas.numel() == 0:
        raise ValueError(f"schedule must be a 1-D tensor of betas, got shape {tuple(betas.shape)}")
    if int(t) != t or not 0 <= int(t) < betas.numel():
        raise ValueError(f"t must be an integer step in [0, {betas.numel()}), got {t!r}")
    t = int(t)
    abar = float(_alphas_cumprod(betas)[t])
    u8 = _as_uint8_hwc(image_u8)
    x0_lv = torch.from_numpy(u8).permute(2, 0, 1).to(torch.float64)
    x0 = x0_lv / _LEVELS
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    xt = (math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * noise).clamp_(0.0, 1.0)
    out_lv = torch.round(xt * _LEVELS).clamp_(0, _LEVELS)
    out = out_lv.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    linf = float((out_lv - x0_lv).abs().max()) / _LEVELS if out_lv.numel() else 0.0
    return out, {"noise/t": float(t), "noise/abar": abar, "noise/linf": linf}


def annealed_noise_step(progress: float, t_start: int, t_end: int) -> int:
    """Noise step annealed linearly from ``t_start`` (progress 0) to ``t_end`` (progress 1), rounded.

    ``progress`` is clamped to [0, 1] (a last step may report slightly over 1).
    """
    if not math.isfinite(progress):
        raise ValueError(f"progress must be finite, got {progress!r}")
    p = min(max(float(progress), 0.0), 1.0)
    return int(round(t_start + (t_end - t_start) * p))

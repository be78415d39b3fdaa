"""Differentiable image -> model-input path for Qwen2-VL / Qwen2.5-VL (pure torch).

The attack (adversary/egas.py) works on a uint8 image that has already been resized once to a size
the processor keeps (core.data.fit_image), held as a float tensor ``x`` in [0, 1] with
``x = u8 / 255``. `image_to_model_inputs` re-implements what the Hugging Face image processor does
to that uint8 image after its (then no-op) resize:

1. rescale: ``u8 * rescale_factor`` (1/255), in float32;
2. normalize: ``(x - image_mean) / image_std`` per channel, in float32;
3. patchify: split into ``patch_size`` patches grouped by ``merge_size`` x ``merge_size`` (the
   order the vision tower's patch merger expects), repeat the still frame ``temporal_patch_size``
   times, flatten each patch to ``C * T * P * P`` values.

Every step is an elementwise op or a reshape/permute, so the result is differentiable in ``x`` and,
because float32 ``u8 / 255`` is bit-identical to the processor's float64-then-float32 rescale for all
256 values and the subtract/divide are single correctly rounded float32 ops, it equals the
processor's ``pixel_values`` bit for bit (tests/unit/test_pixels.py checks this against the real
processor). A size the processor would resize raises ValueError instead of silently disagreeing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from core.images import smart_resize
from core.policy import image_size_limits

__all__ = ["image_to_model_inputs", "to_float_image", "to_uint8_image"]


def _image_processor(processor):
    """The image processor of a full processor, or the argument itself if it is one."""
    return getattr(processor, "image_processor", processor)


def _per_channel(value, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    vals = [float(v) for v in value] if isinstance(value, Sequence | np.ndarray) else [float(value)] * channels
    if len(vals) != channels:
        raise ValueError(f"expected {channels} per-channel values, got {len(vals)}")
    # Round through float32 first, as the processor builds mean/std in the image's float32 dtype;
    # a float64 input (gradient checks) then sees the same constants.
    return torch.tensor(vals, dtype=torch.float32).to(device=device, dtype=dtype).view(channels, 1, 1)


def _check_size(height: int, width: int, processor) -> None:
    min_pixels, max_pixels, factor = image_size_limits(processor)
    try:
        target = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:
        raise ValueError(f"image size {height}x{width} (HxW) is not usable by the processor: {e}") from None
    target = (int(target[0]), int(target[1]))
    if target != (height, width):
        raise ValueError(
            f"image size {height}x{width} (HxW) would be resized by the processor to "
            f"{target[0]}x{target[1]} (min_pixels={min_pixels}, max_pixels={max_pixels}, factor={factor}); "
            "resize it first (core.data.fit_image / fitted_size) so pixel_values match the processor")


def _one_image(x: torch.Tensor, processor) -> tuple[torch.Tensor, list[int]]:
    ip = _image_processor(processor)
    if x.dim() != 3:
        raise ValueError(f"expected an image [C, H, W], got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(f"expected a float image in [0, 1], got dtype {x.dtype} (use to_float_image)")
    channels, height, width = (int(s) for s in x.shape)
    _check_size(height, width, processor)
    patch, merge, temporal = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    gh, gw = height // patch, width // patch

    # x = u8 / 255; the processor computes u8 * rescale_factor. For the standard 1/255 the two are
    # the same number, so x is used as is (multiplying by 255 * (1/255) would cost exactness).
    if getattr(ip, "do_rescale", True):
        scale = 255.0 * float(ip.rescale_factor)
    else:
        scale = 255.0
    if abs(scale - 1.0) > 1e-12:
        x = x * scale
    if getattr(ip, "do_normalize", True):
        mean = _per_channel(ip.image_mean, channels, x.dtype, x.device)
        std = _per_channel(ip.image_std, channels, x.dtype, x.device)
        x = (x - mean) / std

    patches = x.reshape(channels, gh // merge, merge, patch, gw // merge, merge, patch)
    patches = patches.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    patches = patches.unsqueeze(5).expand(*patches.shape[:5], temporal, patch, patch)  # frame repeated
    flat = patches.reshape(gh * gw, channels * temporal * patch * patch)
    return flat, [1, gh, gw]


def image_to_model_inputs(image: torch.Tensor | Sequence[torch.Tensor], processor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [N, C*T*P*P], image_grid_thw [n_images, 3] int64)`` of float images in [0, 1].

    ``image`` is ``[3, H, W]``, a batch ``[B, 3, H, W]`` or a sequence of ``[3, H, W]`` tensors
    (sizes may differ); the patches of several images are concatenated in order, as the processor
    does. Each image's size must be one the processor keeps (``smart_resize(H, W) == (H, W)``),
    else ValueError. Differentiable; float32 in gives float32 out equal to
    ``processor.image_processor(images=[uint8 image])`` for ``image = u8 / 255``; other float dtypes
    (float64 for gradient checks) pass through. ``processor`` is the full processor or its image
    processor; mean/std/patch/merge/temporal sizes are read from it.
    """
    if isinstance(image, torch.Tensor):
        if image.dim() == 3:
            images = [image]
        elif image.dim() == 4:
            images = list(image.unbind(0))
        else:
            raise ValueError(f"expected [3, H, W] or [B, 3, H, W], got shape {tuple(image.shape)}")
    else:
        images = list(image)
    if not images:
        raise ValueError("no images")
    values, grids = [], []
    for x in images:
        flat, grid = _one_image(x, processor)
        values.append(flat)
        grids.append(grid)
    pixel_values = values[0] if len(values) == 1 else torch.cat(values, dim=0)
    grid_thw = torch.tensor(grids, dtype=torch.int64, device=pixel_values.device)
    return pixel_values, grid_thw


def to_float_image(image_u8) -> torch.Tensor:
    """``[H, W, 3]`` uint8 (numpy or torch) -> ``[3, H, W]`` float32 in [0, 1], ``u8 / 255``."""
    # a copy: arrays from pyarrow or Ray's object store are read-only, which torch warns about
    t = torch.from_numpy(np.array(image_u8, copy=True)) if isinstance(image_u8, np.ndarray) else image_u8
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a numpy array or tensor, got {type(image_u8).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {t.dtype}")
    if t.dim() != 3 or t.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W, 3], got shape {tuple(t.shape)}")
    return t.permute(2, 0, 1).to(torch.float32) / 255


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` float in [0, 1] -> ``[H, W, 3]`` uint8, ``round(x * 255)``.

    Values are rounded in float64 and clamped to [0, 255]; anything that does not round into that
    range (beyond half a level outside [0, 1]) or is not finite raises ValueError, as it is a bug
    upstream rather than something to clip quietly.
    """
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got shape {tuple(x.shape)}")
    levels = x.detach().to(device="cpu", dtype=torch.float64) * 255.0
    if not bool(torch.isfinite(levels).all()):
        raise ValueError("image has non-finite values")
    lo, hi = float(levels.min()), float(levels.max())
    if lo < -0.5 or hi > 255.5:
        raise ValueError(f"image values out of [0, 1]: min {lo / 255:.6g}, max {hi / 255:.6g}")
    out = torch.round(levels).clamp_(0, 255).to(torch.uint8)
    return out.permute(1, 2, 0).contiguous().numpy()

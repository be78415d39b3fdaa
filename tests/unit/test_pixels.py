"""adversary.pixels: the torch image -> model-input path equals the Hugging Face processor exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adversary.pixels import image_to_model_inputs, to_float_image, to_uint8_image
from core.policy import image_size_limits

SIZES = [(56, 56), (112, 112), (84, 140), (224, 56), (56, 224), (168, 224)]


@pytest.fixture(scope="module")
def tiny_qwen25_dir(tmp_path_factory):
    from core.policy import build_tiny_policy

    return build_tiny_policy(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), arch="qwen2_5_vl", seed=0)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def processor(request, tiny_policy_dir, tiny_qwen25_dir):
    from core.policy import load_processor

    folder = tiny_policy_dir if request.param == "qwen2_vl" else tiny_qwen25_dir
    return load_processor(folder)


def _random_u8(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _reference(processor, images):
    out = processor.image_processor(images=list(images), return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize("size", SIZES)
def test_matches_processor(processor, size):
    u8 = _random_u8(*size, seed=size[0] * 1000 + size[1])
    ref_pv, ref_grid = _reference(processor, [u8])
    pv, grid = image_to_model_inputs(to_float_image(u8), processor)
    assert pv.dtype == torch.float32 and grid.dtype == torch.int64
    assert pv.shape == ref_pv.shape and torch.equal(grid, ref_grid)
    diff = (pv - ref_pv.to(torch.float32)).abs().max().item()
    print(f"{type(processor).__name__} {size[0]}x{size[1]}: max |diff| vs processor = {diff:.3g}")
    assert diff <= 1e-6


def test_extreme_pixel_values_match(processor):
    u8 = np.zeros((56, 84, 3), dtype=np.uint8)
    u8[::2] = 255
    u8[:, ::3, 1] = 1
    ref_pv, _ = _reference(processor, [u8])
    pv, _ = image_to_model_inputs(to_float_image(u8), processor)
    assert (pv - ref_pv).abs().max().item() <= 1e-6


def test_accepts_full_or_image_processor(processor):
    x = to_float_image(_random_u8(56, 56, seed=3))
    a, ga = image_to_model_inputs(x, processor)
    b, gb = image_to_model_inputs(x, processor.image_processor)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_batch_of_different_sizes(processor):
    imgs = [_random_u8(84, 140, seed=1), _random_u8(224, 56, seed=2)]
    ref_pv, ref_grid = _reference(processor, imgs)
    pv, grid = image_to_model_inputs([to_float_image(u) for u in imgs], processor)
    assert torch.equal(grid, ref_grid) and grid.shape == (2, 3)
    diff = (pv - ref_pv).abs().max().item()
    print(f"batch of two sizes: max |diff| = {diff:.3g}")
    assert pv.shape == ref_pv.shape and diff <= 1e-6


def test_stacked_batch_same_size(processor):
    imgs = [_random_u8(112, 56, seed=s) for s in (4, 5, 6)]
    ref_pv, ref_grid = _reference(processor, imgs)
    pv, grid = image_to_model_inputs(torch.stack([to_float_image(u) for u in imgs]), processor)
    assert torch.equal(grid, ref_grid)
    assert (pv - ref_pv).abs().max().item() <= 1e-6


def test_gradient_matches_finite_differences(processor):
    torch.manual_seed(0)
    x = torch.rand(3, 56, 84, dtype=torch.float64, requires_grad=True)
    pv, _ = image_to_model_inputs(x, processor)
    assert pv.dtype == torch.float64
    w = torch.randn_like(pv)

    def f(img):
        return (w * image_to_model_inputs(img, processor)[0]).sum()

    (grad,) = torch.autograd.grad(f(x), x)
    h = 1e-6
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        c, i, j = (int(torch.randint(0, n, (1,), generator=gen)) for n in x.shape)
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[c, i, j] += h
        xm[c, i, j] -= h
        fd = (f(xp) - f(xm)).item() / (2 * h)
        assert fd == pytest.approx(grad[c, i, j].item(), rel=1e-6, abs=1e-8)
    # linear map: each pixel feeds exactly temporal_patch_size entries, each scaled by 1/std
    assert torch.count_nonzero(grad) == grad.numel()


def test_gradient_float32_path(processor):
    x = to_float_image(_random_u8(56, 56, seed=7)).requires_grad_(True)
    pv, _ = image_to_model_inputs(x, processor)
    pv.sum().backward()
    std = torch.tensor(processor.image_processor.image_std, dtype=torch.float32).view(3, 1, 1)
    t = processor.image_processor.temporal_patch_size
    torch.testing.assert_close(x.grad, (t / std).expand_as(x.grad), rtol=1e-6, atol=0)


@pytest.mark.parametrize("size", [(57, 57), (56, 57), (28, 28), (252, 252), (224, 280)])
def test_invalid_size_raises(processor, size):
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}") as info:
        image_to_model_inputs(torch.rand(3, *size), processor)
    assert "resized" in str(info.value)


def test_invalid_size_names_target(processor):
    min_pixels, max_pixels, factor = image_size_limits(processor)
    assert factor == 28 and max_pixels == 224 * 224 and min_pixels == 56 * 56
    with pytest.raises(ValueError, match="57x57.*56x56"):
        image_to_model_inputs(torch.rand(3, 57, 57), processor)
    with pytest.raises(ValueError, match="252x252.*224x224"):
        image_to_model_inputs(torch.rand(3, 252, 252), processor)


def test_bad_shapes_and_dtypes(processor):
    with pytest.raises(ValueError):
        image_to_model_inputs(torch.rand(56, 56), processor)
    with pytest.raises(TypeError):
        image_to_model_inputs(torch.zeros(3, 56, 56, dtype=torch.uint8), processor)
    with pytest.raises(ValueError):
        image_to_model_inputs([], processor)


def test_float_uint8_round_trip():
    u8 = _random_u8(30, 17, seed=11)
    u8[0, 0] = [0, 255, 128]
    x = to_float_image(u8)
    assert x.shape == (3, 30, 17) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert np.array_equal(to_uint8_image(x), u8)
    assert np.array_equal(to_uint8_image(x.to(torch.float64)), u8)
    # every level survives the round trip, and the float is exactly level / 255 in float32
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    xl = to_float_image(levels)
    assert np.array_equal(to_uint8_image(xl), levels)
    assert torch.equal(xl[0].flatten(), torch.arange(256, dtype=torch.float32) / 255)
    # torch uint8 input works too
    assert torch.equal(to_float_image(torch.from_numpy(u8)), x)


def test_to_uint8_rounds_clamps_and_rejects():
    x = torch.tensor([0.0, 1.0, 0.4 / 255, 0.6 / 255, -1e-7, 1 + 1e-7]).view(3, 1, 2)
    out = to_uint8_image(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    assert out.transpose(2, 0, 1).flatten().tolist() == [0, 255, 0, 1, 0, 255]
    with pytest.raises(ValueError):
        to_uint8_image(torch.full((3, 2, 2), 1.5))
    with pytest.raises(ValueError):
        to_uint8_image(torch.full((3, 2, 2), -0.1))
    with pytest.raises(ValueError):
        to_uint8_image(torch.full((3, 2, 2), float("nan")))
    with pytest.raises(TypeError):
        to_float_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        to_float_image(np.zeros((4, 4), dtype=np.uint8))

"""adversary.egas: PGD on raw pixels stays on the uint8 grid; the Gaussian-noise baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adversary.egas import annealed_noise_step, noise_perturb, pgd_attack, sigmoid_beta_schedule
from adversary.pixels import to_float_image


def _image(h=20, w=24, seed=0, lo=0, hi=256):
    return np.random.default_rng(seed).integers(lo, hi, size=(h, w, 3), dtype=np.uint8)


def _weights(shape, seed=0):
    """Random ±1 weights with about a fifth zeros, as a [3, H, W] float32 tensor."""
    w = torch.from_numpy(np.random.default_rng(seed).choice([-1.0, 0.0, 1.0], p=[0.4, 0.2, 0.4], size=shape))
    return w.to(torch.float32)


def _linear(w):
    return lambda x: (w * x).sum()


def _levels(u8):
    return torch.from_numpy(u8).permute(2, 0, 1).to(torch.int64)


def test_one_step_moves_exactly_by_sign():
    u8 = _image(lo=2, hi=254)  # away from the box: no clipping
    w = _weights((3, 20, 24))
    adv, m = pgd_attack(_linear(w), u8, step_size=2 / 255, steps=1)
    assert adv.dtype == np.uint8 and adv.shape == u8.shape
    delta = _levels(adv) - _levels(u8)
    assert torch.all(delta[w > 0] == 2)
    assert torch.all(delta[w < 0] == -2)
    assert torch.all(delta[w == 0] == 0)
    assert m["egas/linf"] == pytest.approx(2 / 255)
    assert m["egas/changed_frac"] == pytest.approx(float((w != 0).float().mean()))
    assert m["egas/steps"] == 1.0 and m["egas/rounded"] == 0.0
    assert m["egas/objective_after"] > m["egas/objective_before"]


def test_box_clipping_at_0_and_255():
    u8 = np.random.default_rng(1).choice(np.array([0, 1, 254, 255, 100], dtype=np.uint8), size=(16, 16, 3))
    w = _weights((3, 16, 16), seed=1)
    adv, _ = pgd_attack(_linear(w), u8, step_size=2 / 255, steps=1)
    x0 = _levels(u8)
    expected = (x0 + 2 * w.to(torch.int64)).clamp(0, 255)
    assert torch.equal(_levels(adv), expected)
    # the box really was hit on both sides
    assert bool(((x0 + 2 * w.to(torch.int64)) < 0).any()) and bool(((x0 + 2 * w.to(torch.int64)) > 255).any())


def test_eps_bounds_multi_step():
    u8 = _image(lo=10, hi=246, seed=2)
    w = _weights((3, 20, 24), seed=2)
    adv, m = pgd_attack(_linear(w), u8, step_size=2 / 255, steps=5, eps=4 / 255)
    delta = _levels(adv) - _levels(u8)
    assert int(delta.abs().max()) == 4
    assert torch.all(delta[w > 0] == 4) and torch.all(delta[w < 0] == -4) and torch.all(delta[w == 0] == 0)
    assert m["egas/linf"] <= 4 / 255 + 1e-12
    assert m["egas/steps"] == 5.0


def test_default_eps_is_step_times_steps():
    u8 = _image(lo=10, hi=246, seed=3)
    w = _weights((3, 20, 24), seed=3)
    adv, m = pgd_attack(_linear(w), u8, step_size=3 / 255, steps=3)
    delta = _levels(adv) - _levels(u8)
    assert torch.all(delta[w > 0] == 9) and torch.all(delta[w < 0] == -9)
    assert m["egas/linf"] == pytest.approx(9 / 255)


def test_sign_flips_inside_ball():
    """A gradient whose sign depends on x: the iterate oscillates but stays on the grid and in the ball."""
    u8 = _image(seed=4, lo=5, hi=250)
    target = to_float_image(u8) + 1.5 / 255

    def objective(x):
        return -((x - target) ** 2).sum()

    adv, m = pgd_attack(objective, u8, step_size=1 / 255, steps=4, eps=3 / 255)
    delta = _levels(adv) - _levels(u8)
    assert int(delta.abs().max()) <= 3
    assert m["egas/rounded"] == 0.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exact_uint8_grid(k):
    u8 = _image(seed=10 + k)
    w = torch.randn(3, 20, 24)
    seen = []

    def objective(x):
        lv = x.detach().to(torch.float64) * 255
        seen.append(float((lv - lv.round()).abs().max()))
        return (w * x).sum()

    adv, m = pgd_attack(objective, u8, step_size=k / 255, steps=4)
    assert adv.dtype == np.uint8 and m["egas/rounded"] == 0.0
    assert max(seen) < 1e-4  # every iterate the objective saw was an exact uint8 image
    delta = (_levels(adv) - _levels(u8)).abs()
    assert int(delta.max()) <= 4 * k
    # interior pixels with a nonzero gradient moved a whole number of steps: 4k exactly
    x0 = _levels(u8)
    interior = (x0 >= 4 * k) & (x0 <= 255 - 4 * k)
    assert torch.all(delta[interior] == 4 * k)


def test_objective_sees_to_float_image():
    u8 = _image(seed=20)
    xs = []

    def objective(x):
        xs.append(x.detach().clone())
        assert x.requires_grad or not torch.is_grad_enabled()
        assert x.dtype == torch.float32 and x.shape == (3, 20, 24)
        return x.sum()

    adv, _ = pgd_attack(objective, u8, step_size=2 / 255, steps=2)
    assert torch.equal(xs[0], to_float_image(u8))
    assert torch.equal(xs[-1], to_float_image(adv))  # the after-forward
    assert len(xs) == 3  # 2 steps + 1 extra no-grad forward


def test_objective_after_ge_before_linear():
    for seed in range(3):
        u8 = _image(seed=30 + seed)
        w = torch.randn(3, 20, 24)
        _, m = pgd_attack(_linear(w), u8, step_size=2 / 255, steps=2)
        assert m["egas/objective_after"] >= m["egas/objective_before"]
        expected_before = float((w * to_float_image(u8)).sum())
        assert m["egas/objective_before"] == pytest.approx(expected_before, rel=1e-6)
        assert all(isinstance(v, float) for v in m.values())


def test_non_multiple_step_rounds():
    u8 = _image(lo=5, hi=250, seed=40)
    w = _weights((3, 20, 24), seed=40)
    adv, m = pgd_attack(_linear(w), u8, step_size=1.6 / 255, steps=1)
    assert m["egas/rounded"] == 1.0 and adv.dtype == np.uint8
    delta = _levels(adv) - _levels(u8)
    assert torch.all(delta[w > 0] == 2) and torch.all(delta[w < 0] == -2) and torch.all(delta[w == 0] == 0)
    _, m = pgd_attack(_linear(w), u8, step_size=2 / 255, steps=2, eps=2.5 / 255)
    assert m["egas/rounded"] == 1.0


def test_zero_and_nan_gradients_leave_pixels():
    u8 = _image(seed=50)
    adv, m = pgd_attack(lambda x: x.sum() * 0.0, u8, step_size=2 / 255, steps=3)
    assert np.array_equal(adv, u8) and m["egas/changed_frac"] == 0.0 and m["egas/linf"] == 0.0
    adv, m = pgd_attack(lambda x: torch.zeros(()), u8)  # no dependence on x at all
    assert np.array_equal(adv, u8)
    mask = torch.zeros(3, 20, 24)
    mask[0, 0, 0] = float("nan")

    def nan_objective(x):
        return (x * torch.where(torch.isnan(mask), mask, torch.ones_like(mask))).sum()

    adv, m = pgd_attack(nan_objective, _image(seed=51, lo=5, hi=250), steps=1)
    assert m["egas/nonfinite_grad"] == 1.0


def test_zero_steps_and_validation():
    u8 = _image(seed=60)
    adv, m = pgd_attack(_linear(torch.ones(3, 20, 24)), u8, steps=0)
    assert np.array_equal(adv, u8)
    assert m["egas/objective_before"] == pytest.approx(m["egas/objective_after"])
    with pytest.raises(ValueError):
        pgd_attack(_linear(torch.ones(3, 20, 24)), u8, step_size=0.0)
    with pytest.raises(ValueError):
        pgd_attack(lambda x: x, u8)  # not a scalar
    with pytest.raises(TypeError):
        pgd_attack(_linear(torch.ones(3, 20, 24)), u8.astype(np.float32))


def test_accepts_torch_uint8():
    u8 = _image(seed=61, lo=3, hi=250)
    w = _weights((3, 20, 24), seed=61)
    a, _ = pgd_attack(_linear(w), u8)
    b, _ = pgd_attack(_linear(w), torch.from_numpy(u8))
    assert np.array_equal(a, b)


# ---------------------------------------------------------------- noise baseline


def _schedule_f64(T=1000, beta_start=1e-5, beta_end=5e-3):
    z = np.linspace(-6.0, 6.0, T, dtype=np.float64)
    betas = 1.0 / (1.0 + np.exp(-z)) * (beta_end - beta_start) + beta_start
    return betas, np.cumprod(1.0 - betas)


def test_schedule_matches_float64_recomputation():
    betas_ref, abar_ref = _schedule_f64()
    betas = sigmoid_beta_schedule()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    np.testing.assert_allclose(betas.numpy(), betas_ref, rtol=1e-12, atol=0)
    u8 = _image(seed=70)
    for t in (0, 1, 250, 500, 999):
        _, m = noise_perturb(u8, t, generator=torch.Generator().manual_seed(0))
        assert m["noise/t"] == float(t)
        assert m["noise/abar"] == pytest.approx(abar_ref[t], rel=1e-12)
    assert betas[0].item() == pytest.approx(1e-5 + 5e-3 / (1 + math.exp(6)) * (1 - 2e-3), rel=1e-12)


def test_noise_deterministic_with_generator():
    u8 = _image(seed=71)
    a, ma = noise_perturb(u8, 300, generator=torch.Generator().manual_seed(123))
    b, mb = noise_perturb(u8, 300, generator=torch.Generator().manual_seed(123))
    c, _ = noise_perturb(u8, 300, generator=torch.Generator().manual_seed(124))
    assert np.array_equal(a, b) and ma == mb
    assert not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == u8.shape


def test_noise_small_t_small_change_large_t_large_change():
    u8 = _image(64, 64, seed=72, lo=20, hi=236)
    small, m0 = noise_perturb(u8, 0, generator=torch.Generator().manual_seed(0))
    big, m1 = noise_perturb(u8, 999, generator=torch.Generator().manual_seed(0))
    d0 = np.abs(small.astype(int) - u8.astype(int))
    d1 = np.abs(big.astype(int) - u8.astype(int))
    assert m0["noise/abar"] > 0.9999
    assert d0.mean() < 2.0 and d0.max() <= 8  # noise std sqrt(1 - abar_0) * 255 ~ 1.3 levels
    assert m1["noise/abar"] < 0.15
    assert d1.mean() > 50.0 and m1["noise/linf"] > 0.5
    assert m0["noise/linf"] == pytest.approx(d0.max() / 255)


def test_noise_custom_schedule_and_validation():
    u8 = _image(seed=73)
    zero = torch.zeros(10, dtype=torch.float64)  # abar = 1: x_t = x0 exactly
    out, m = noise_perturb(u8, 5, schedule=zero, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(out, u8) and m["noise/abar"] == 1.0 and m["noise/linf"] == 0.0
    with pytest.raises(ValueError):
        noise_perturb(u8, 10, schedule=zero)
    with pytest.raises(ValueError):
        noise_perturb(u8, -1)


def test_annealing_endpoints():
    assert annealed_noise_step(0.0, 500, 0) == 500
    assert annealed_noise_step(1.0, 500, 0) == 0
    assert annealed_noise_step(0.5, 500, 0) == 250
    assert annealed_noise_step(0.5, 100, 300) == 200
    assert annealed_noise_step(1.2, 500, 0) == 0 and annealed_noise_step(-0.1, 500, 0) == 500
    assert isinstance(annealed_noise_step(0.33, 450, 10), int)
    steps = [annealed_noise_step(p / 100, 400, 0) for p in range(101)]
    assert steps == sorted(steps, reverse=True)
    with pytest.raises(ValueError):
        annealed_noise_step(float("nan"), 1, 0)

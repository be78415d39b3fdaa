import math

import pytest
import torch

from adversary.tsec import band_mask, selective_entropy, token_entropy


def _ref_entropy(logits: torch.Tensor) -> torch.Tensor:
    """float64 reference from the very values the function sees (bf16 upcast exactly)."""
    z = logits.to(torch.float64)
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * torch.where(torch.isinf(logp), 0.0, logp)).sum(-1)


def _ref_band(entropy, mask, low, high, scope, mode):
    """Plain-Python selection, written independently of the vectorised one."""
    ent, m = entropy.tolist(), mask.tolist()
    rows = [[(r, c) for c in range(len(m[0])) if m[r][c]] for r in range(len(m))]
    if scope == "group":
        rows = [[p for row in rows for p in row]]
    out = [[False] * len(m[0]) for _ in m]
    for row in rows:
        n = len(row)
        if n == 0:
            continue
        order = sorted(range(n), key=lambda i: (ent[row[i][0]][row[i][1]], i))
        lo, hi = math.floor(low * n + 0.5), math.floor(high * n + 0.5)
        if lo >= hi:
            lo, hi = (n - 1) // 2, (n - 1) // 2 + 1
        k = hi - lo
        ranks = {"band": range(lo, hi), "top": range(n - k, n), "bottom": range(k), "all": range(n)}[mode]
        for r in ranks:
            rr, cc = row[order[r]]
            out[rr][cc] = True
    return torch.tensor(out, dtype=torch.bool)


def _row(values):
    e = torch.tensor([values], dtype=torch.float32)
    return e, torch.ones_like(e, dtype=torch.bool)


def _kept(keep):
    return torch.nonzero(keep.reshape(-1)).flatten().tolist()


# ----------------------------------------------------------------------------- token_entropy


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-4), (torch.float16, 1e-4)])
@pytest.mark.parametrize(
    "shape,chunk",
    [((2, 5, 33), 3), ((3, 7, 50), 1024), ((4, 6, 17), 24), ((1, 1, 8), 1), ((13, 64), 5), ((0, 9), 4)],
)
def test_token_entropy_matches_float64_reference(dtype, rtol, shape, chunk):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=g) * 3).to(dtype)
    out = token_entropy(logits, chunk_size=chunk)
    assert out.dtype == torch.float32 and out.shape == shape[:-1]
    torch.testing.assert_close(out.double(), _ref_entropy(logits), rtol=rtol, atol=1e-5)


def test_token_entropy_large_vocab_bf16():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 150_000, generator=g) * 4).to(torch.bfloat16)
    out = token_entropy(logits, chunk_size=2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref_entropy(logits), rtol=1e-4, atol=1e-5)


def test_token_entropy_extremes():
    v = 1000
    one_hot = torch.full((v,), -1e4)
    one_hot[7] = 1e4
    spread = torch.linspace(-1e4, 1e4, v)
    uniform = torch.zeros(v)
    masked = torch.full((v,), -math.inf)  # vocabulary masked down to two equal tokens
    masked[:2] = 0.0
    logits = torch.stack([one_hot, spread, uniform, masked])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        z = logits.clamp(-6e4, 6e4).to(dtype) if dtype == torch.float16 else logits.to(dtype)
        out = token_entropy(z, chunk_size=3)
        assert torch.isfinite(out).all()
        assert out[0].item() == pytest.approx(0.0, abs=1e-6)
        # a ramp with steps of 20 logits is one-hot in fp32; bf16/fp16 rounding may tie the top few
        assert out[1].item() == pytest.approx(_ref_entropy(z[1]).item(), abs=1e-5)
        assert out[2].item() == pytest.approx(math.log(v), rel=1e-6)
        assert out[3].item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("v", [2, 4096, 151_936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_entropy_uniform_is_log_v_exactly(v, dtype):
    out = token_entropy(torch.full((3, v), 2.5, dtype=dtype), chunk_size=2)
    assert out.tolist() == [torch.tensor(math.log(v), dtype=torch.float32).item()] * 3


def test_token_entropy_gradcheck_float64_across_chunks():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    out = token_entropy(logits, chunk_size=4)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda z: token_entropy(z, chunk_size=4), (logits,))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_token_entropy_grad_matches_float64_autograd(dtype, tol):
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(3, 4, 40, generator=g) * 2).to(dtype)
    base[0, 0, :10] = -math.inf  # masked vocabulary entries must get a zero, finite gradient
    weights = torch.randn(3, 4, generator=g)

    z = base.clone().requires_grad_(True)
    (token_entropy(z, chunk_size=5) * weights).sum().backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad).all()
    assert (z.grad[0, 0, :10] == 0).all()

    ref = base.double().requires_grad_(True)
    (_ref_entropy(ref) * weights.double()).sum().backward()
    torch.testing.assert_close(z.grad.double(), ref.grad, rtol=tol, atol=tol)


def test_token_entropy_large_vocab_grad_and_saved_memory():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(2, 3, 150_000, generator=g).to(torch.bfloat16)
    weights = torch.randn(2, 3, generator=g)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    z = base.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_entropy(z, chunk_size=4)
    # only the bf16 logits and the [N] entropy are kept for backward, no float32 [N, V] copies
    assert sum(saved) == base.numel() * 2 + 6 * 4
    (out * weights).sum().backward()
    ref = base.double().requires_grad_(True)
    (_ref_entropy(ref) * weights.double()).sum().backward()
    torch.testing.assert_close(z.grad.double(), ref.grad, rtol=2e-2, atol=1e-6)


def test_token_entropy_no_grad_and_validation():
    with torch.no_grad():
        out = token_entropy(torch.randn(2, 3, 8, requires_grad=True), chunk_size=2)
    assert not out.requires_grad
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            token_entropy(torch.randn(2, 8), chunk_size=bad)
    with pytest.raises(ValueError, match="floating"):
        token_entropy(torch.ones(2, 8, dtype=torch.long))


# ----------------------------------------------------------------------------- band_mask


def test_band_n9_keeps_middle_third_exactly():
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0]  # ranks 3,4,5 are values 4,5,6
    e, m = _row(values)
    assert _kept(band_mask(e, m)) == [0, 7, 8]


@pytest.mark.parametrize(
    "n,kept_ranks",
    [
        (1, [0]),
        (2, [0]),
        (3, [1]),
        (4, [1, 2]),
        (5, [2]),
        (6, [2, 3]),
        (7, [2, 3, 4]),
        (8, [3, 4]),
        (9, [3, 4, 5]),
    ],
)
def test_band_ranks_for_small_n(n, kept_ranks):
    # entropies are a reversed permutation so that rank != position
    values = [float(n - i) for i in range(n)]  # rank r sits at position n-1-r
    e, m = _row(values)
    assert _kept(band_mask(e, m)) == sorted(n - 1 - r for r in kept_ranks)


def test_band_n2_empty_band_falls_back_to_lower_entropy_token():
    e, m = _row([0.9, 0.2])
    assert _kept(band_mask(e, m)) == [1]


def test_band_rounding_is_half_up():
    # band [0.5, 1] on n=5: 2.5 rounds up to 3 (round-half-even would give 2)
    e, m = _row([10.0, 20.0, 30.0, 40.0, 50.0])
    assert _kept(band_mask(e, m, low=0.5, high=1.0)) == [3, 4]
    # n=3: 1.5 -> 2
    e, m = _row([3.0, 2.0, 1.0])
    assert _kept(band_mask(e, m, low=0.5, high=1.0)) == [0]  # rank 2 only
    # n=1: 0.5 -> 1, 1.5 -> 1: empty band -> the median (the single token)
    e, m = _row([4.0])
    assert _kept(band_mask(e, m, low=0.5, high=1.0)) == [0]


def test_band_ties_break_by_position():
    e, m = _row([1.0] * 9)
    assert _kept(band_mask(e, m)) == [3, 4, 5]
    assert _kept(band_mask(e, m, mode="bottom")) == [0, 1, 2]
    assert _kept(band_mask(e, m, mode="top")) == [6, 7, 8]


def test_band_ignores_padding_and_its_garbage():
    e = torch.tensor([[5.0, 1.0, math.nan, 9.0, 3.0, -math.inf, 7.0, 2.0, 8.0, 4.0, 6.0, math.inf, 4.5]])
    m = torch.tensor([[True, True, False, True, True, False, True, True, True, True, True, False, False]])
    keep = band_mask(e, m)
    assert _kept(keep) == [0, 9, 10]  # values 5, 4, 6; 4.5 is padding and falls in the band
    for mode in ("band", "all", "random", "top", "bottom"):
        for scope in ("sequence", "group"):
            k = band_mask(e, m, mode=mode, scope=scope, generator=torch.Generator().manual_seed(0))
            assert not (k & ~m).any()


def test_band_valid_inf_entropy_is_ranked_not_confused_with_padding():
    e = torch.tensor([[math.inf, 0.0, 1.0, 2.0]])
    m = torch.tensor([[True, False, True, True]])
    assert _kept(band_mask(e, m, mode="top")) == [0]  # n=3, k=1: the +inf token is the top one
    assert _kept(band_mask(e, m)) == [3]


def test_band_rows_with_different_n():
    e = torch.tensor(
        [
            [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0],
            [3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0] * 9,
        ]
    )
    lengths = torch.tensor([9, 6, 2, 0])
    m = torch.arange(9)[None, :] < lengths[:, None]
    keep = band_mask(e, m)
    assert [torch.nonzero(r).flatten().tolist() for r in keep] == [[3, 4, 5], [2, 3], [1], []]


def test_scope_group_differs_from_sequence():
    # row 0 is all low entropies, row 1 all high: per sequence each row keeps its middle,
    # over the group the middle third of the 6 pooled tokens is the top of row 0 and bottom of row 1.
    e = torch.tensor([[0.1, 0.3, 0.2], [0.9, 0.7, 0.8]])
    m = torch.ones_like(e, dtype=torch.bool)
    seq = band_mask(e, m, scope="sequence")
    grp = band_mask(e, m, scope="group")
    assert seq.tolist() == [[False, False, True], [False, False, True]]
    assert grp.tolist() == [[False, True, False], [False, True, False]]


def test_scope_group_ties_break_by_row_major_position():
    e = torch.ones(3, 3)
    m = torch.ones_like(e, dtype=torch.bool)
    assert _kept(band_mask(e, m, scope="group")) == [3, 4, 5]


def test_modes_all_top_bottom():
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.0]
    e = torch.tensor([values])
    m = torch.tensor([[True] * 9 + [False]])
    assert torch.equal(band_mask(e, m, mode="all"), m)
    assert _kept(band_mask(e, m, mode="top")) == [2, 4, 6]  # 9, 7, 8
    assert _kept(band_mask(e, m, mode="bottom")) == [1, 3, 5]  # 1, 3, 2


def test_mode_random_count_subset_and_reproducibility():
    g = torch.Generator().manual_seed(5)
    e = torch.randn(4, 30, generator=g)
    lengths = torch.tensor([30, 17, 9, 0])
    m = torch.arange(30)[None, :] < lengths[:, None]
    band = band_mask(e, m)

    def draw(seed):
        return band_mask(e, m, mode="random", generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for keep in (a, c):
        assert torch.equal(keep.sum(-1), band.sum(-1))
        assert not (keep & ~m).any()
    assert not torch.equal(a, band)
    grp = band_mask(e, m, mode="random", scope="group", generator=torch.Generator().manual_seed(0))
    assert grp.sum() == band_mask(e, m, scope="group").sum()


def test_mode_random_is_roughly_uniform():
    e, m = _row([float(i) for i in range(9)])
    counts = torch.zeros(9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        counts += band_mask(e, m, mode="random", generator=gen)[0].float()
    assert counts.sum() == 1800
    assert ((counts > 140) & (counts < 260)).all()  # expected 200 each


def test_custom_bands():
    e, m = _row([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0])
    assert torch.equal(band_mask(e, m, low=0.0, high=1.0), m)
    assert _kept(band_mask(e, m, low=0.5, high=1.0)) == [2, 4, 6, 8]  # 4.5 -> 5: ranks 5..8, values 6..9


@pytest.mark.parametrize("scope", ["sequence", "group"])
@pytest.mark.parametrize("mode", ["band", "all", "top", "bottom"])
@pytest.mark.parametrize(
    "band", [(1 / 3, 2 / 3), (0.0, 1.0), (0.5, 1.0), (0.1, 0.2), (0.25, 0.75), (0.0, 0.05)]
)
def test_band_matches_python_reference_on_random_batches(scope, mode, band):
    g = torch.Generator().manual_seed(int(band[0] * 1000 + band[1] * 10))
    for _ in range(10):
        b, length = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 25, (1,), generator=g))
        e = torch.randint(0, 6, (b, length), generator=g).float()  # many ties
        m = torch.rand(b, length, generator=g) < 0.7
        e[~m] = torch.tensor(math.nan)
        got = band_mask(e, m, low=band[0], high=band[1], scope=scope, mode=mode)
        assert torch.equal(got, _ref_band(e, m, band[0], band[1], scope, mode))


def test_band_mask_detaches_and_validates():
    e = torch.randn(2, 6, requires_grad=True)
    m = torch.ones(2, 6, dtype=torch.bool)
    keep = band_mask(e, m)
    assert keep.dtype == torch.bool and not keep.requires_grad
    for low, high in [(-0.1, 0.5), (0.5, 0.5), (0.6, 0.4), (0.0, 1.1), (math.nan, 0.5)]:
        with pytest.raises(ValueError, match="band"):
            band_mask(e, m, low=low, high=high)
    with pytest.raises(ValueError, match="scope"):
        band_mask(e, m, scope="batch")
    with pytest.raises(ValueError, match="mode"):
        band_mask(e, m, mode="middle")
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        band_mask(e, m[:, :3])
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        band_mask(e.reshape(-1), m.reshape(-1))


def test_band_mask_accepts_integer_mask():
    e, m = _row([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0])
    assert torch.equal(band_mask(e, m.long()), band_mask(e, m))


# ----------------------------------------------------------------------------- selective_entropy


def test_selective_entropy_value_grad_and_metrics():
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0]
    e = torch.tensor([values], requires_grad=True)
    m = torch.ones(1, 9, dtype=torch.bool)
    value, metrics = selective_entropy(e, m)
    assert value.dim() == 0 and value.dtype == torch.float32
    assert value.item() == pytest.approx(5.0)
    value.backward()
    expected = torch.zeros(1, 9)
    expected[0, [0, 7, 8]] = 1 / 3
    torch.testing.assert_close(e.grad, expected)
    assert metrics == {
        "tsec/tokens_kept": 3.0,
        "tsec/tokens_valid": 9.0,
        "tsec/band_low": 4.0,
        "tsec/band_high": 6.0,
        "tsec/mean_all": 5.0,
    }
    assert all(type(v) is float for v in metrics.values())


def test_selective_entropy_token_mean_over_batch_with_padding_garbage():
    e = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, math.nan, math.inf],
            [10.0, 30.0, 20.0, -math.inf, 0.0, 0.0, 0.0, 0.0],
        ],
        requires_grad=True,
    )
    m = torch.tensor([[True] * 6 + [False] * 2, [True] * 3 + [False] * 5])
    value, metrics = selective_entropy(e, m)
    # row 0 (n=6) keeps 3, 4; row 1 (n=3) keeps 20: pooled token mean
    assert value.item() == pytest.approx((3 + 4 + 20) / 3)
    value.backward()
    assert torch.isfinite(e.grad).all()
    expected = torch.zeros(2, 8)
    expected[0, [2, 3]] = 1 / 3
    expected[1, 2] = 1 / 3
    torch.testing.assert_close(e.grad, expected)
    assert metrics["tsec/tokens_kept"] == 3.0 and metrics["tsec/tokens_valid"] == 9.0
    assert metrics["tsec/band_low"] == 3.0 and metrics["tsec/band_high"] == 20.0
    assert metrics["tsec/mean_all"] == pytest.approx((21 + 60) / 9)


def test_selective_entropy_empty_mask():
    e = torch.tensor([[1.0, math.nan], [2.0, 3.0]], requires_grad=True)
    m = torch.zeros(2, 2, dtype=torch.bool)
    value, metrics = selective_entropy(e, m)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(e.grad, torch.zeros(2, 2))
    assert metrics == {
        "tsec/tokens_kept": 0.0,
        "tsec/tokens_valid": 0.0,
        "tsec/band_low": 0.0,
        "tsec/band_high": 0.0,
        "tsec/mean_all": 0.0,
    }


def test_selective_entropy_modes_and_end_to_end_from_logits():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 10, 50, generator=g).to(torch.bfloat16).requires_grad_(True)
    m = torch.ones(3, 10, dtype=torch.bool)
    m[1, 6:] = False
    ent = token_entropy(logits, chunk_size=7)
    value, metrics = selective_entropy(ent, m, scope="group")
    assert value.dtype == torch.float32 and metrics["tsec/tokens_valid"] == 26.0
    assert metrics["tsec/band_low"] <= value.item() <= metrics["tsec/band_high"]
    value.backward()
    grad_rows = logits.grad.abs().sum(-1) > 0  # [B, L]: only kept positions receive gradient
    assert torch.equal(grad_rows, band_mask(ent.detach(), m, scope="group"))

    all_value, all_metrics = selective_entropy(ent.detach(), m, mode="all")
    assert all_value.item() == pytest.approx(all_metrics["tsec/mean_all"], rel=1e-6)
    assert all_metrics["tsec/tokens_kept"] == 26.0
    top, _ = selective_entropy(ent.detach(), m, mode="top")
    bottom, _ = selective_entropy(ent.detach(), m, mode="bottom")
    band, _ = selective_entropy(ent.detach(), m)
    assert bottom.item() <= band.item() <= top.item()

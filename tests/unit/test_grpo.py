import math

import pytest
import torch

from learner.grpo import _valid_only, group_advantages, policy_loss

# ----------------------------------------------------------------------------- group_advantages


def _ref_adv(rewards, ids, eps=1e-6, scale="std"):
    """float64 loop over groups, written independently of the vectorised version."""
    r = torch.tensor(rewards, dtype=torch.float64)
    out = torch.zeros_like(r)
    for g in set(ids):
        idx = [i for i, x in enumerate(ids) if x == g]
        v = r[idx]
        if len(idx) < 2 or bool((v == v[0]).all()):
            continue
        c = v - v.mean()
        out[idx] = c / (v.std() + eps) if scale == "std" else c
    return out


def test_adv_hand_one_group():
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.zeros(4, dtype=torch.int64))
    std = math.sqrt(1.0 / 3.0)  # unbiased: 4 * 0.25 / 3
    expect = 0.5 / (std + 1e-6)
    assert adv.dtype == torch.float32
    assert abs(expect - 0.8660239) < 1e-6
    torch.testing.assert_close(adv, torch.tensor([expect, -expect, expect, -expect]), rtol=0, atol=1e-7)


def test_adv_interleaved_non_contiguous_ids():
    g = torch.Generator().manual_seed(0)
    ids = [7, -3, 7, 100, -3, 100, 7, 5, 100, -3, 7, 42, 42]
    rewards = (torch.randn(len(ids), generator=g, dtype=torch.float64) * 3 + 10).tolist()
    adv = group_advantages(torch.tensor(rewards), torch.tensor(ids))
    ref = _ref_adv(torch.tensor(rewards, dtype=torch.float32).tolist(), ids)
    torch.testing.assert_close(adv.double(), ref, rtol=1e-6, atol=1e-6)
    # each multi-member group with spread is centred and unit-std (up to eps)
    for gid in (7, -3, 100, 42):
        sel = torch.tensor([x == gid for x in ids])
        assert abs(adv[sel].sum().item()) < 1e-5
        assert abs(adv[sel].double().std().item() - 1.0) < 1e-4
    assert adv[ids.index(5)].item() == 0.0  # singleton


def test_adv_degenerate_groups_are_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 5.0, 1.0, 2.0, -7.0])
    ids = torch.tensor([3, 3, 3, 9, 1, 1, 11])
    for scale in ("std", "none"):
        adv = group_advantages(rewards, ids, scale=scale)
        assert torch.equal(adv[[0, 1, 2, 3, 6]], torch.zeros(5))
        assert adv[4].item() < 0 < adv[5].item()


def test_adv_scale_none_is_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 5.0])
    ids = torch.tensor([2, 2, 2, 0, 0])
    adv = group_advantages(rewards, ids, scale="none")
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, 1.0]))
    torch.testing.assert_close(adv.double(), _ref_adv(rewards.tolist(), ids.tolist(), scale="none"))


def test_adv_float64_reference_random():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 6, (50,), generator=g) * 13 - 20
    rewards = torch.randint(0, 3, (50,), generator=g).to(torch.float64) * 0.5
    adv = group_advantages(rewards, ids, eps=1e-4)
    torch.testing.assert_close(adv.double(), _ref_adv(rewards.tolist(), ids.tolist(), eps=1e-4), rtol=1e-6, atol=1e-6)


def test_adv_errors_and_empty():
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3), torch.zeros(3, dtype=torch.int64), scale="mad")
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError):
        group_advantages(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3), torch.zeros(3))
    assert group_advantages(torch.ones(0), torch.zeros(0, dtype=torch.int64)).shape == (0,)


# ----------------------------------------------------------------------------- policy_loss


def _ref_loss(logp, old, adv, mask, cl, ch, agg, ref=None, kl_coef=0.0):
    """Straightforward per-token float64 loop; returns (loss, grad wrt logp)."""
    lp = logp.detach().to(torch.float64).clone().requires_grad_(True)
    B, L = lp.shape
    per_seq = []
    for b in range(B):
        toks = []
        for t in range(L):
            if not mask[b, t]:
                continue
            a = float(adv[b] if adv.dim() == 1 else adv[b, t])
            r = torch.exp(lp[b, t] - float(old[b, t]))
            rv = r.item()
            if (a >= 0 and rv > 1 + ch) or (a < 0 and rv < 1 - cl):
                # clipped branch is the min: constant, no gradient
                tok = -a * torch.clamp(r.detach(), 1 - cl, 1 + ch)
            else:
                tok = -a * r
            if ref is not None and kl_coef > 0:
                d = float(ref[b, t]) - lp[b, t]
                tok = tok + kl_coef * (torch.exp(d) - d - 1)
            toks.append(tok)
        per_seq.append(toks)
    if agg == "token-mean":
        flat = [x for s in per_seq for x in s]
        loss = torch.stack(flat).sum() / len(flat)
    else:
        means = [torch.stack(s).sum() / len(s) for s in per_seq if s]
        loss = torch.stack(means).sum() / len(means)
    loss.backward()
    return loss.detach(), lp.grad


def _random_batch(seed, B=5, L=7, dtype=torch.float64, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, L, generator=g, dtype=dtype) * 3
    old = logp + torch.randn(B, L, generator=g, dtype=dtype) * 0.4  # many ratios outside [0.8, 1.2]
    adv = torch.randn((B, L) if token_adv else (B,), generator=g, dtype=dtype)
    ref = logp + torch.randn(B, L, generator=g, dtype=dtype) * 0.3
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[0] = True
    mask[2] = False  # a sequence with no valid token
    mask[3, 0] = True
    # padding garbage must not leak
    for t in (logp, old, ref):
        t[~mask] = float("nan")
    if token_adv:
        adv[~mask] = float("nan")
    return logp, old, adv, ref, mask


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("token_adv", [False, True])
@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.2, 0.28)])
def test_policy_loss_matches_reference(agg, with_kl, token_adv, clip):
    logp, old, adv, ref, mask = _random_batch(3, token_adv=token_adv)
    cl, ch = clip
    kl_coef = 0.05 if with_kl else 0.0
    exp_loss, exp_grad = _ref_loss(logp, old, adv, mask, cl, ch, agg, ref, kl_coef)
    x = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        x, old, adv, mask, cl, ch, aggregation=agg, ref_logprobs=ref if with_kl else None, kl_coef=kl_coef
    )
    loss.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), exp_loss, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    torch.testing.assert_close(x.grad, torch.nan_to_num(exp_grad, nan=0.0), rtol=1e-10, atol=1e-12)
    assert metrics["actor/pg_loss"] == pytest.approx(
        _ref_loss(logp, old, adv, mask, cl, ch, agg)[0].item(), rel=1e-10
    )


def test_policy_loss_float32_inputs():
    logp, old, adv, ref, mask = _random_batch(4)
    exp_loss, exp_grad = _ref_loss(logp, old, adv, mask, 0.2, 0.2, "token-mean", ref, 0.1)
    x = logp.float().requires_grad_(True)
    loss, _ = policy_loss(x, old.float(), adv.float(), mask, ref_logprobs=ref.float(), kl_coef=0.1)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), exp_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), torch.nan_to_num(exp_grad), rtol=1e-5, atol=1e-6)


def _one(logp, old, a, **kw):
    x = torch.tensor([[logp]], dtype=torch.float64, requires_grad=True)
    loss, m = policy_loss(x, torch.tensor([[old]], dtype=torch.float64), torch.tensor([a], dtype=torch.float64),
                          torch.ones(1, 1, dtype=torch.bool), **kw)
    loss.backward()
    return loss.item(), x.grad.item(), m


def test_hand_cases_clipping():
    loss, grad, m = _one(math.log(1.5), 0.0, 1.0)
    assert loss == pytest.approx(-1.2) and grad == 0.0 and m["actor/clip_frac"] == 1.0
    loss, grad, m = _one(math.log(0.5), 0.0, -1.0)
    assert loss == pytest.approx(0.8) and grad == 0.0 and m["actor/clip_frac"] == 1.0
    # outside the range but on the side the min keeps unclipped: gradient flows
    loss, grad, m = _one(math.log(1.5), 0.0, -1.0)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5) and m["actor/clip_frac"] == 0.0
    for a, r in ((1.0, 1.1), (-2.0, 0.9), (0.5, 1.0)):
        loss, grad, m = _one(math.log(r), 0.0, a)
        assert loss == pytest.approx(-a * r) and grad == pytest.approx(-a * r)
        assert m["actor/clip_frac"] == 0.0
    # asymmetric clip-higher
    loss, grad, _ = _one(math.log(1.25), 0.0, 1.0, clip_high=0.28)
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25)


def test_kl_term_hand_values():
    x = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(2.0), 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True]])
    loss, m = policy_loss(x, torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), mask,
                          ref_logprobs=ref, kl_coef=0.5)
    loss.backward()
    k3 = 2.0 - math.log(2.0) - 1.0
    assert loss.item() == pytest.approx(0.5 * k3 / 2)
    assert m["actor/kl_ref"] == pytest.approx(k3 / 2)
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    torch.testing.assert_close(x.grad, torch.tensor([[0.5 * (1 - 2.0) / 2, 0.0]], dtype=torch.float64))
    # kl_coef == 0: monitored but not optimised
    loss0, m0 = policy_loss(x, torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), mask,
                            ref_logprobs=ref, kl_coef=0.0)
    assert loss0.item() == 0.0 and m0["actor/kl_ref"] == pytest.approx(k3 / 2)
    assert "actor/kl_ref" not in policy_loss(x, x.detach(), torch.zeros(1), mask)[1]


def test_metrics_values():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 9.0]], dtype=torch.float64))
    old = torch.zeros(1, 4, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    _, m = policy_loss(logp, old, adv, mask)
    assert m["actor/clip_frac"] == pytest.approx(2 / 3)
    assert m["actor/ratio_mean"] == pytest.approx(1.0)
    assert m["actor/ratio_max"] == pytest.approx(1.5)
    assert m["actor/ratio_min"] == pytest.approx(0.5)
    assert m["actor/approx_kl"] == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 3)
    assert m["actor/pg_loss"] == pytest.approx((-1.2 + 0.8 - 1.0) / 3)
    assert all(isinstance(v, float) for v in m.values())


def test_gradients_reach_logprobs_only():
    logp, old, adv, ref, mask = _random_batch(5, token_adv=True)
    leaves = [t.clone().requires_grad_(True) for t in (logp, old, adv, ref)]
    for mode in ("clip", "kl_cov", "clip_cov"):
        for t in leaves:
            t.grad = None
        loss, _ = policy_loss(leaves[0], leaves[1], leaves[2], mask, ref_logprobs=leaves[3], kl_coef=0.1, mode=mode,
                              kl_cov_frac=0.2, clip_cov_frac=0.2, clip_cov_bounds=(-10.0, 10.0),
                              generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert leaves[0].grad is not None and torch.isfinite(leaves[0].grad).all()
        assert all(t.grad is None for t in leaves[1:])


def test_all_padding_batch_is_zero_not_nan():
    x = torch.full((2, 3), float("nan"), dtype=torch.float64, requires_grad=True)
    loss, m = policy_loss(x, x.detach(), torch.ones(2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros(2, 3, dtype=torch.float64))
    assert not any(math.isnan(v) for v in m.values())


def test_policy_loss_errors():
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError):
        policy_loss(x, x, torch.zeros(2), mask, aggregation="seq-sum")
    with pytest.raises(ValueError):
        policy_loss(x, x, torch.zeros(2), mask, mode="dual")
    with pytest.raises(ValueError):
        policy_loss(x, x, torch.zeros(3), mask)
    with pytest.raises(ValueError):
        policy_loss(x, torch.zeros(2, 4), torch.zeros(2), mask)
    with pytest.raises(ValueError):
        policy_loss(x, x, torch.zeros(2), mask, mode="kl_cov", kl_cov_frac=0.0)
    with pytest.raises(ValueError):
        policy_loss(x, x, torch.zeros(2), mask, mode="clip_cov", clip_cov_frac=0.0)


# ----------------------------------------------------------------------------- the pieces of policy_loss
# (kl_cov / clip_cov, against verl and by hand: test_grpo_cov.py)


def test_valid_only_promotes_bf16_and_zeroes_padding():
    logp = torch.tensor([[-1.0, float("nan")], [float("inf"), -2.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[1, 0], [0, 1]])  # 0/1 ints are accepted as a mask
    lp, old, adv, m = _valid_only(logp, logp.float() - 0.5, torch.tensor([3.0, -1.0]), mask)
    assert lp.dtype == old.dtype == adv.dtype == torch.float32 and m.dtype == torch.bool
    assert torch.equal(lp, torch.tensor([[-1.0, 0.0], [0.0, -2.0]]))
    assert torch.equal(old, torch.tensor([[-1.5, 0.0], [0.0, -2.5]]))
    assert torch.equal(adv, torch.tensor([[3.0, 0.0], [0.0, -1.0]]))  # [B] broadcast over L, then masked

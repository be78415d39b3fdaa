import math

import pytest
import torch

from learner.grpo import group_advantages, policy_loss

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


# ----------------------------------------------------------------------------- kl_cov / clip_cov vs verl


def _mm(x, mask):
    return (x * mask).sum() / mask.sum()


def _agg(loss_mat, mask, agg):
    if agg == "token-mean":
        return _mm(loss_mat, mask)
    tok = mask.sum(-1)
    keep = tok > 0
    return ((loss_mat * mask).sum(-1)[keep] / tok[keep]).mean()


def _verl_kl_cov(old_log_prob, log_prob, advantages, response_mask, agg, kl_cov_ratio, ppo_kl_coef):
    """Transcription of verl compute_policy_loss_kl_cov (advantages already [B, L])."""
    negative_approx_kl = log_prob - old_log_prob
    abs_kl = negative_approx_kl.abs()
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses_kl = -advantages * ratio + ppo_kl_coef * abs_kl
    pg_losses = pg_losses1.clone()
    all_valid = response_mask > 0
    all_valid_idx = torch.nonzero(all_valid.reshape(-1), as_tuple=True)[0]
    all_valid_adv = advantages[all_valid].detach().reshape(-1)
    all_valid_logp = log_prob[all_valid].detach().reshape(-1)
    if min(kl_cov_ratio, len(all_valid_adv)) != 0:
        cov_lst_all = (all_valid_adv - all_valid_adv.mean()) * (all_valid_logp - all_valid_logp.mean())
        k_percent_nums = max(1, int(len(cov_lst_all) * kl_cov_ratio))
        large = all_valid_idx[torch.topk(cov_lst_all, k_percent_nums, largest=True).indices]
        W = advantages.shape[1]
        pg_losses[large // W, large % W] = pg_losses_kl[large // W, large % W]
    return _agg(pg_losses, response_mask, agg)


def _verl_clip_cov(old_log_prob, log_prob, advantages, response_mask, agg, clip_cov_ratio, lb, ub, cl, ch, gen):
    """Transcription of verl compute_policy_loss_clip_cov (randperm given our generator)."""
    ratio = torch.exp(log_prob - old_log_prob)
    pg_losses1 = -advantages * ratio
    corr = torch.ones_like(advantages)
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cl, 1 + ch)
    clip_by_origin = (pg_losses2 > pg_losses1) & (response_mask > 0)
    cov_all = (advantages - _mm(advantages, response_mask)) * (log_prob - _mm(log_prob.detach(), response_mask))
    cov_all = cov_all.detach().clone()
    cov_all[response_mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(clip_cov_ratio * response_mask.sum().item()), 1)
    top_k_idx = torch.nonzero((cov_all < ub) & (cov_all > lb) & (response_mask > 0))
    if len(top_k_idx) > 0:
        perm = torch.randperm(len(top_k_idx), generator=gen)
        top_k_idx = top_k_idx[perm[: min(clip_num, len(top_k_idx))]]
    else:
        top_k_idx = torch.empty((0, 2), dtype=torch.long)
    corr[top_k_idx[:, 0], top_k_idx[:, 1]] = 0
    frac = _mm((corr == 0).to(ratio.dtype), response_mask)
    return _agg(torch.maximum(pg_losses1, pg_losses2) * corr, response_mask, agg), frac


def _clean_batch(seed, B=6, L=9):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, L, generator=g, dtype=torch.float64) * 4
    old = logp + torch.randn(B, L, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, L, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, L, generator=g) > 0.25
    return logp, old, adv, mask


def _grad_of(fn, logp):
    x = logp.clone().requires_grad_(True)
    out = fn(x)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("frac", [0.002, 0.1, 0.5])
def test_kl_cov_matches_verl(agg, frac):
    logp, old, adv, mask = _clean_batch(7)
    exp_loss, exp_grad = _grad_of(lambda x: _verl_kl_cov(old, x, adv, mask.double(), agg, frac, 0.7), logp)
    got_loss, got_grad = _grad_of(
        lambda x: policy_loss(x, old, adv, mask, aggregation=agg, mode="kl_cov", kl_cov_frac=frac, kl_cov_coef=0.7),
        logp,
    )
    torch.testing.assert_close(got_loss, exp_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, exp_grad, rtol=1e-10, atol=1e-12)
    _, m = policy_loss(logp, old, adv, mask, mode="kl_cov", kl_cov_frac=frac)
    assert m["actor/cov_frac"] == pytest.approx(max(1, int(mask.sum().item() * frac)) / mask.sum().item())
    assert m["actor/clip_frac"] == 0.0
    assert m["actor/ppo_kl_abs"] == pytest.approx(((logp - old).abs()[mask]).mean().item())


def test_kl_cov_tiny_known_selection():
    # valid-token means: A = 0, logp = -1. cov = A * (logp + 1): token 1 is the largest (2 * 1 = 2).
    logp = torch.tensor([[-2.0, 0.0, -1.0, -1.0, 5.0]], dtype=torch.float64)
    old = logp - torch.tensor([[0.1, 0.3, -0.2, 0.0, 0.0]], dtype=torch.float64)  # ratios e^0.1, e^0.3, ...
    adv = torch.tensor([[-1.0, 2.0, -1.0, 0.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False]])
    # n_valid = 4, frac 0.25 -> 1 token; token 1 gets + coef * |0.3|, no clipping anywhere (r = e^0.3 > 1.2)
    r = torch.exp(torch.tensor([0.1, 0.3, -0.2, 0.0], dtype=torch.float64))
    a = adv[0, :4]
    expect = (-a * r).sum() + 2.0 * 0.3
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, mask, mode="kl_cov", kl_cov_frac=0.25, kl_cov_coef=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(expect.item() / 4)
    exp_grad = torch.cat([-a * r, torch.zeros(1, dtype=torch.float64)]) / 4
    exp_grad[1] += 2.0 / 4  # d|logp - old| / dlogp = sign(0.3)
    torch.testing.assert_close(x.grad[0], exp_grad)
    assert m["actor/cov_frac"] == 0.25


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("frac,bounds", [(0.0002, (0.1, 5.0)), (0.2, (0.0, 3.0)), (0.9, (-1.0, 10.0))])
def test_clip_cov_matches_verl(agg, frac, bounds):
    logp, old, adv, mask = _clean_batch(11)
    lb, ub = bounds
    exp_loss, exp_grad = _grad_of(
        lambda x: _verl_clip_cov(old, x, adv, mask.double(), agg, frac, lb, ub, 0.2, 0.28,
                                 torch.Generator().manual_seed(123)),
        logp,
    )
    got_loss, got_grad = _grad_of(
        lambda x: policy_loss(x, old, adv, mask, 0.2, 0.28, aggregation=agg, mode="clip_cov", clip_cov_frac=frac,
                              clip_cov_bounds=bounds, generator=torch.Generator().manual_seed(123)),
        logp,
    )
    torch.testing.assert_close(got_loss, exp_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, exp_grad, rtol=1e-10, atol=1e-12)
    _, exp_frac = _verl_clip_cov(old, logp, adv, mask.double(), agg, frac, lb, ub, 0.2, 0.28,
                                 torch.Generator().manual_seed(123))
    _, m = policy_loss(logp, old, adv, mask, 0.2, 0.28, mode="clip_cov", clip_cov_frac=frac, clip_cov_bounds=bounds,
                       generator=torch.Generator().manual_seed(123))
    assert m["actor/cov_frac"] == pytest.approx(exp_frac.item())
    assert exp_frac.item() > 0


def test_clip_cov_tiny_known_selection():
    # valid-token means: A = 0, logp = -1.5; cov = A * (logp + 1.5) = [3, 1, 0.5, 4]; token 1 sits on lb
    # (the band is open, as in verl)
    logp = torch.tensor([[0.0, -0.5, -2.0, -3.5]], dtype=torch.float64)
    adv = torch.tensor([[2.0, 1.0, -1.0, -2.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    # token 0: ratio 1.5 with A > 0 -> clipped by the ratio, excluded although cov = 3 is in band;
    # token 3: cov 4 in (1, 5) and not ratio-clipped -> the only candidate, its term drops out.
    old = logp - torch.tensor([[math.log(1.5), 0.0, 0.0, 0.05]], dtype=torch.float64)
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, mask, mode="clip_cov", clip_cov_frac=0.0002, clip_cov_bounds=(1.0, 5.0),
                          generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() == pytest.approx((-2.0 * 1.2 - 1.0 + 1.0 + 0.0) / 4)
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, -1.0 / 4, 1.0 / 4, 0.0]], dtype=torch.float64))
    assert m["actor/cov_frac"] == 0.25 and m["actor/clip_frac"] == 0.25
    # no candidate in band -> plain clipped loss
    loss2, m2 = policy_loss(logp, old, adv, mask, mode="clip_cov", clip_cov_bounds=(10.0, 20.0))
    loss3, _ = policy_loss(logp, old, adv, mask)
    assert loss2.item() == loss3.item() and m2["actor/cov_frac"] == 0.0

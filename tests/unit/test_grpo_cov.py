"""kl_cov / clip_cov (the Entropy-Mechanism loss modes of learner.grpo) against a transcription of verl, and
their pieces by hand."""

import math

import pytest
import torch

from learner.grpo import clip_cov_losses, kl_cov_losses, policy_loss

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



# ----------------------------------------------------------------------------- the pieces, by hand


def _cov_case():
    # valid tokens 0..2 (token 3 is padding, already zeroed): mean A = 0, mean logp = -2, so
    # cov = (A - 0) * (logp + 2) = [2 * 1, -1 * 0, -1 * -1] = [2, 0, 1]
    adv = torch.tensor([[2.0, -1.0, -1.0, 0.0]], dtype=torch.float64)
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    return adv, logp, mask


def test_kl_cov_losses_hand_values():
    adv, logp, mask = _cov_case()
    pg = torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=torch.float64)
    log_ratio = torch.tensor([[0.5, -0.2, 0.1, 0.0]], dtype=torch.float64)
    # frac 0.5: max(1, int(3 * 0.5)) = 1 token, the largest cov (token 0) gets + 2 * |0.5|
    losses, m = kl_cov_losses(pg, log_ratio, adv, logp, mask, frac=0.5, coef=2.0)
    assert torch.equal(losses, torch.tensor([[2.0, 2.0, 3.0, 0.0]], dtype=torch.float64))
    assert m["actor/cov_frac"] == pytest.approx(1 / 3) and m["actor/clip_frac"] == 0.0
    assert m["actor/ppo_kl_abs"] == pytest.approx(0.8 / 3)
    # frac 0.7: int(2.1) = 2 tokens, cov 2 and 1 (tokens 0 and 2)
    losses, m = kl_cov_losses(pg, log_ratio, adv, logp, mask, frac=0.7, coef=2.0)
    assert torch.equal(losses, torch.tensor([[2.0, 2.0, 3.2, 0.0]], dtype=torch.float64))
    assert m["actor/cov_frac"] == pytest.approx(2 / 3)


def test_clip_cov_losses_hand_values():
    adv, logp, mask = _cov_case()
    pg_unclipped = torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=torch.float64)
    pg_clipped = torch.tensor([[1.5, 1.0, 2.0, 0.0]], dtype=torch.float64)
    # token 0 is ratio-clipped, token 1's cov 0 is outside (0.5, 3): token 2 is the only candidate
    clip_active = torch.tensor([[True, False, False, False]])
    losses, m = clip_cov_losses(pg_unclipped, pg_clipped, clip_active, adv, logp, mask, frac=0.01,
                                bounds=(0.5, 3.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(losses, torch.tensor([[1.5, 2.0, 0.0, 0.0]], dtype=torch.float64))
    assert m == {"actor/clip_frac": pytest.approx(1 / 3), "actor/cov_frac": pytest.approx(1 / 3)}
    # without the ratio clip both 0 and 2 are candidates; max(1, int(0.01 * 3)) = 1 of them is dropped
    losses, m = clip_cov_losses(pg_unclipped, pg_clipped, torch.zeros_like(clip_active), adv, logp, mask,
                                frac=0.01, bounds=(0.5, 3.0), generator=torch.Generator().manual_seed(0))
    assert int((losses[0, [0, 2]] == 0).sum()) == 1 and losses[0, 1] == 2.0
    assert m["actor/cov_frac"] == pytest.approx(1 / 3) and m["actor/clip_frac"] == 0.0

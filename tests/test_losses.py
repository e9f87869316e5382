"""The loss against an independent numpy computation, the T^2 factor's purpose, and logit matching as
the high-temperature limit of distillation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.errors import KdcacheError
from kdcache.losses import distillation_loss, distillation_losses, soft_targets, teacher_log_probs
from kdcache.sparse import targets_from_arrays, topk_rows
from tests.test_train_stacked import _topk_manifest


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(s, z, y, T, alpha, ensemble="mean-prob", members=None):
    """Written from the paper's formula, in float64 numpy, sharing no code with kdcache."""
    s, z = s.astype(np.float64), z.astype(np.float64)
    if members is not None:
        z = z[:, members]
    p = np_softmax(z / T).mean(1) if ensemble == "mean-prob" else np_softmax(z.mean(1) / T)
    q = np_softmax(s / T)
    kl = (p * (np.log(p) - np.log(q))).sum(-1).mean()
    has = y >= 0
    ce = -np.log(np_softmax(s)[has, y[has]]).mean() if has.any() else 0.0
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize("T", [1.0, 2.5, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("ensemble,members", [("mean-prob", None), ("mean-logit", None), ("mean-prob", [0, 2])])
def test_loss_matches_independent_computation(T, alpha, ensemble, members):
    g = np.random.default_rng(0)
    s = g.normal(0, 3, (16, 10)).astype(np.float32)
    z = g.normal(0, 4, (16, 3, 10)).astype(np.float16)
    y = g.integers(0, 10, 16)
    y[[1, 4, 9]] = -1  # unlabelled rows: soft term only
    got = distillation_loss(torch.from_numpy(s), torch.from_numpy(z), torch.from_numpy(y), T, alpha, ensemble,
                            members)
    assert got.item() == pytest.approx(reference(s, z, y, T, alpha, ensemble, members), rel=1e-5, abs=1e-6)


def test_mean_prob_is_the_mean_of_member_probabilities():
    z = torch.tensor([[[10.0, 0.0], [0.0, 10.0]]])  # two confident members that disagree
    np.testing.assert_allclose(soft_targets(z, 1.0).numpy(), [[0.5, 0.5]], atol=1e-4)
    np.testing.assert_allclose(soft_targets(z, 1.0, "mean-logit").numpy(), [[0.5, 0.5]], atol=1e-6)
    z = torch.tensor([[[4.0, 0.0], [0.0, 0.0]]])
    p_mean = (np_softmax(np.array([4.0, 0.0])) + 0.5) / 2
    np.testing.assert_allclose(soft_targets(z, 1.0).numpy()[0], p_mean, rtol=1e-6)
    np.testing.assert_allclose(soft_targets(z, 1.0, members=[1]).numpy()[0], [0.5, 0.5], rtol=1e-6)


def test_kl_is_batchmean_not_mean_over_classes():
    s = torch.zeros(4, 100)
    z = torch.zeros(4, 1, 100)
    z[:, 0, 0] = 5.0
    loss = distillation_loss(s, z, torch.full((4,), -1), 1.0, 1.0)
    p = np_softmax(np.r_[5.0, np.zeros(99)])
    assert loss.item() == pytest.approx((p * np.log(p * 100)).sum(), rel=1e-5)  # not divided by 100


def test_t_squared_keeps_soft_gradient_size_across_temperatures():
    """Hinton et al. sec. 2: the soft term's gradient scales as 1/T^2, which the T^2 factor cancels."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(256, 10, generator=g)
    z = torch.randn(256, 1, 10, generator=g) * 2
    s, z = s - s.mean(-1, keepdim=True), z - z.mean(-1, keepdim=True)
    norms, raw = [], []
    for T in (2.0, 5.0, 10.0, 20.0):
        x = s.clone().requires_grad_()
        distillation_loss(x, z, torch.full((256,), -1), T, 1.0).backward()
        norms.append(x.grad.norm().item())
        raw.append(norms[-1] / T ** 2)  # what a loss without the factor would give
    assert max(norms) / min(norms) < 1.5
    assert max(raw) / min(raw) > 50


def test_refusals():
    z = torch.zeros(2, 2, 3)
    with pytest.raises(KdcacheError, match="temperature must be positive"):
        teacher_log_probs(z, 0.0)
    with pytest.raises(KdcacheError, match=r"members \[5\] asked for, the store has members 0..1"):
        teacher_log_probs(z, 1.0, members=[5])
    with pytest.raises(KdcacheError, match="ensemble reduction 'median' is unknown"):
        teacher_log_probs(z, 1.0, "median")
    with pytest.raises(KdcacheError, match=r"teacher_logits must be \[batch, members, classes\]"):
        teacher_log_probs(torch.zeros(2, 3), 1.0)


def test_kd_approaches_logit_matching_as_t_grows():
    """Hinton et al. sec. 2.1: with zero-mean logits, the gradient of the T^2-scaled soft loss tends to
    (v_i - z_i) / C as T grows, which is the gradient of logit matching (Ba & Caruana): the relative
    error shrinks like 1/T (err * T levels off), and at T = 1 the two differ. With an ensemble both
    reductions tend to the members' mean logit. Run with -s for the figures."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(256, 10, generator=g) * 2
    y = torch.full((256,), -1)
    for members in (1, 3):
        z = torch.randn(256, members, 10, generator=g) * 3
        x = s.clone().requires_grad_()
        distillation_loss(x, z, y, 1.0, 1.0, loss="logit-mse").backward()
        matching = x.grad.clone()
        torch.testing.assert_close(matching, ((s - s.mean(-1, keepdim=True))
                                              - (z.mean(1) - z.mean((1, 2))[:, None])) / 10 / 256)
        for ensemble in ("mean-prob", "mean-logit"):
            err = {}
            for T in (1.0, 2.0, 5.0, 20.0, 100.0, 1000.0):
                x = s.clone().requires_grad_()
                distillation_loss(x, z, y, T, 1.0, ensemble).backward()
                err[T] = ((x.grad - matching).norm() / matching.norm()).item()
            print(members, ensemble, {T: round(e, 4) for T, e in err.items()})
            assert err[1.0] > 0.3  # at T = 1 distillation is not logit matching
            assert all(err[a] > err[b] for a, b in ((1.0, 2.0), (2.0, 5.0), (5.0, 20.0), (20.0, 100.0)))
            rate = [err[T] * T for T in (20.0, 100.0, 1000.0)]  # ~ constant: the error is O(1/T)
            assert max(rate) / min(rate) < 1.05, rate
            assert err[1000.0] < 2e-3


def test_logit_matching_is_the_stacked_students_own_loss_and_refused_without_dense_logits():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 12, 7, generator=g)
    z = torch.randn(12, 2, 7, generator=g)
    y = torch.randint(0, 7, (12,), generator=g)
    losses, temps, alphas = ["kd", "logit-mse", "logit-mse"], [4.0, None, None], [0.9, 0.9, 0.5]
    got = distillation_losses(s, z, y, temps, alphas, losses=losses)
    want = torch.stack([distillation_loss(s[i], z, y, t, a, loss=loss_name) for i, (t, a, loss_name) in
                        enumerate(zip(temps, alphas, losses))])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    alone = distillation_loss(s[1], z, y, None, 1.0, loss="logit-mse")
    d = (s[1] - s[1].mean(-1, keepdim=True)) - (z.mean(1) - z.mean(1).mean(-1, keepdim=True))
    assert alone.item() == pytest.approx((d ** 2).sum().item() / (2 * 7 * 12), rel=1e-6)
    with pytest.raises(KdcacheError, match="loss 'mse' is unknown; use one of kd, logit-mse"):
        distillation_loss(s[0], z, y, 1.0, 0.5, loss="mse")
    sparse = targets_from_arrays(_topk_manifest(), topk_rows(z[:, :1], 3, [1.0]))
    with pytest.raises(KdcacheError, match="logit matching needs every logit"):
        distillation_loss(s[0], sparse, y, 1.0, 0.5, loss="logit-mse")
    with pytest.raises(KdcacheError, match="logit matching needs every logit"):
        distillation_losses(s, sparse, y, temps, alphas, losses=losses)

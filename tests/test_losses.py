"""Losses: 4-D peaks vs brute force, affinity vs a double loop, saliency weights by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from coseg_cli import losses as L
from coseg_cli.config import CosegConfig

# the paper's loss weights, as the config holds them
WEIGHTS = {"lambda_copeak": CosegConfig.lambda_copeak,
           "lambda_affinity": CosegConfig.lambda_affinity, "alpha": CosegConfig.affinity_alpha}


def _brute_local_max(t: np.ndarray) -> np.ndarray:
    """81-neighbour check (80 neighbours + itself), ties count, borders clipped."""
    out = np.zeros(t.shape, bool)
    shape = t.shape
    for idx in itertools.product(*(range(s) for s in shape)):
        best = -np.inf
        for off in itertools.product((-1, 0, 1), repeat=4):
            nb = tuple(i + o for i, o in zip(idx, off))
            if all(0 <= n < s for n, s in zip(nb, shape)):
                best = max(best, t[nb])
        out[idx] = t[idx] >= best
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_max_4d_equals_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 3, size=(2, 3, 4, 5, 3)).astype(np.float32)  # many ties
    got = (torch.from_numpy(t) >= L.local_max_4d(torch.from_numpy(t))).numpy()
    for p in range(2):
        np.testing.assert_array_equal(got[p], _brute_local_max(t[p]))


def test_copeak_mask_adds_median_threshold():
    rng = np.random.default_rng(3)
    t = rng.integers(0, 4, size=(2, 3, 3, 4, 2)).astype(np.float32)
    got = L.copeak_mask(torch.from_numpy(t)).numpy()
    for p in range(2):
        want = _brute_local_max(t[p]) & (t[p] >= np.median(t[p]))
        np.testing.assert_array_equal(got[p], want)


def test_copeak_loss_single_cell_by_hand():
    f = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    fhat = L.normalize_features(f)  # norm² = 25 / 25.01
    sn, sm = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.8)
    v = 0.5 * 0.8 * 25.0 / 25.01
    assert math.isclose(float(L.copeak_loss(fhat, fhat, sn, sm)), math.log1p(math.exp(-v)),
                        rel_tol=1e-6)


def test_copeak_loss_averages_peak_values_and_sums_pairs():
    torch.manual_seed(0)
    fn = L.normalize_features(torch.rand(2, 5, 3, 3))
    fm = L.normalize_features(torch.rand(2, 5, 3, 3))
    sn, sm = torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3)
    ts = L.saliency_correlation(fn, fm, sn, sm)
    want = 0.0
    for p in range(2):
        t = ts[p].numpy()
        mask = _brute_local_max(t) & (t >= np.median(t))
        want += math.log1p(math.exp(-float(t[mask].mean())))
    assert math.isclose(float(L.copeak_loss(fn, fm, sn, sm)), want, rel_tol=1e-5)


def test_affinity_loss_equals_double_loop():
    torch.manual_seed(1)
    feats = L.normalize_features(torch.randn(2, 3, 2, 3))
    sal = torch.rand(2, 1, 2, 3)
    alpha = 4.0
    x = feats.permute(0, 2, 3, 1).reshape(-1, 3)
    s = sal.reshape(-1)
    n = x.shape[0]
    a = b = 0.0
    for p in range(n):
        for q in range(n):
            pq = float(x[p] @ x[q])
            a += float(s[p] * s[q]) * (1 - pq)
            b += float((s[p] - s[q]) ** 2) * pq
    want = a / n**2 + alpha * b / n**2
    assert math.isclose(float(L.affinity_loss(feats, sal, alpha)), want, rel_tol=1e-5)


def test_saliency_weights_and_loss_by_hand():
    prior = torch.tensor([[0.9, 0.1], [0.2, 0.0]]).view(1, 1, 2, 2)  # mean 0.3 → ε = 1/4
    w = L.saliency_weights(prior)
    np.testing.assert_allclose(w.view(-1).numpy(), [0.75, 0.25, 0.25, 0.25])
    s = torch.full_like(prior, 0.5)
    want = (0.75 * 0.16 + 0.25 * (0.16 + 0.09 + 0.25)) / 4
    assert math.isclose(float(L.saliency_loss(s, prior)), want, rel_tol=1e-6)
    # Per image ε, summed over the batch.
    two = torch.cat([prior, prior.flip(-1)])
    assert math.isclose(float(L.saliency_loss(torch.cat([s, s]), two)), 2 * want, rel_tol=1e-6)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_constant_and_zero_inputs_give_finite_losses_and_grads(fill):
    feats = torch.full((4, 8, 3, 3), fill, requires_grad=True)
    logits = torch.zeros(4, 1, 3, 3, requires_grad=True)
    priors = torch.full((4, 1, 96, 96), fill)
    total, parts = L.total_loss(feats, logits, priors, **WEIGHTS)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    total.backward()
    assert torch.isfinite(feats.grad).all() and torch.isfinite(logits.grad).all()
    if fill == 0.0:  # all-zero correlation: every cell ties as a peak, v = 0 → log 2 per pair
        assert math.isclose(float(parts["copeak"].detach()), 2 * math.log(2), rel_tol=1e-6)


def test_total_loss_weights_and_odd_batch_rejected():
    torch.manual_seed(2)
    feats, logits = torch.rand(4, 6, 3, 3), torch.randn(4, 1, 3, 3)
    priors = torch.rand(4, 1, 96, 96)
    total, p = L.total_loss(feats, logits, priors, lambda_copeak=0.3, lambda_affinity=0.7,
                            alpha=2.0)
    want = p["saliency"] + 0.3 * p["copeak"] + 0.7 * p["affinity"]
    assert math.isclose(float(total), float(want), rel_tol=1e-6)
    affinity = L.affinity_loss(L.normalize_features(feats), torch.sigmoid(logits), 2.0)
    assert math.isclose(float(p["affinity"]), float(affinity), rel_tol=1e-6)
    with pytest.raises(ValueError):
        L.total_loss(feats[:3], logits[:3], priors[:3], **WEIGHTS)


def test_full_size_correlation_and_copeaks_equal_a_per_pair_reference():
    """Paper size (512 ch, 14×14 at 448 px), 3 pairs: the batched einsum and 4-D pooling give
    what each pair gives on its own, computed another way (a matrix product and scipy's
    3×3×3×3 maximum filter, whose "nearest" border repeats edge values, as clipping does)."""
    from scipy.ndimage import maximum_filter

    torch.manual_seed(4)
    fn = L.normalize_features(torch.rand(3, 512, 14, 14))
    fm = fn.flip(0)
    # Pairs of different saliency scales have different medians (a shared one would show), and
    # a dim band (rows 0–4 of image n) holds local maxima below the median (dropped by it).
    sn = torch.rand(3, 1, 14, 14) * torch.tensor([1.0, 0.2, 0.6]).view(3, 1, 1, 1)
    sn[:, :, :5] *= 0.05
    sm = torch.rand(3, 1, 14, 14)
    ts = L.saliency_correlation(fn, fm, sn, sm)
    mask = L.copeak_mask(ts)
    assert ts.shape == (3, 14, 14, 14, 14) and mask.shape == ts.shape
    for p in range(3):
        feats_n, feats_m = fn[p].reshape(512, -1), fm[p].reshape(512, -1)  # [C, 196]
        want = (sn[p].reshape(-1, 1) * sm[p].reshape(1, -1)) * (feats_n.T @ feats_m)
        np.testing.assert_allclose(ts[p].numpy(), want.reshape(14, 14, 14, 14).numpy(),
                                   rtol=1e-5, atol=1e-6)
        t = ts[p].numpy()
        peaks = t >= maximum_filter(t, size=3, mode="nearest")
        above = t >= np.median(t)
        np.testing.assert_array_equal(mask[p].numpy(), peaks & above)
        assert (peaks & above).any() and (peaks & ~above).any()  # the median drops some peaks
    # the batched loss is the sum of the per-pair losses
    per_pair = sum(float(L.copeak_loss(fn[p:p + 1], fm[p:p + 1], sn[p:p + 1], sm[p:p + 1]))
                   for p in range(3))
    assert math.isclose(float(L.copeak_loss(fn, fm, sn, sm)), per_pair, rel_tol=1e-5)

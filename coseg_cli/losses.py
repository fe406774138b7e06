"""The three DeepCO3 losses (paper §3.2, eq. 2–6, in the forms of the authors' code), vectorised
over pairs/pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import upsample_logits

FEATURE_EPS = 0.01  # authors' code: F̂ = F / sqrt(Σ_c F² + 0.01)


def normalize_features(feats: Tensor) -> Tensor:
    """Per-location L2 normalisation, softened so all-zero (ReLU-dead) cells stay finite.

    Args:
        feats: float[B,C,h,w].

    Returns:
        float[B,C,h,w], each location's vector of norm < 1.
    """
    return feats / torch.sqrt((feats * feats).sum(dim=1, keepdim=True) + FEATURE_EPS)


def _as_maps(s: Tensor) -> Tensor:
    """[P,1,h,w] or [P,h,w] → [P,h,w]."""
    return s[:, 0] if s.dim() == 4 else s


def local_max_4d(t: Tensor) -> Tensor:
    """Max over each element's 3×3×3×3 neighbourhood (borders see only what exists).

    Max is separable over a box, so it is a 3-D max-pool over the last three axes followed by
    a 1-D max-pool over the first.

    Args:
        t: float[P,a,b,c,d].

    Returns:
        float[P,a,b,c,d], the neighbourhood maxima (the element itself included).
    """
    p, a, b, c, d = t.shape
    m = F.max_pool3d(t.reshape(p * a, 1, b, c, d), kernel_size=3, stride=1, padding=1)
    m = m.reshape(p, a, b * c * d).transpose(1, 2).reshape(p * b * c * d, 1, a)
    m = F.max_pool1d(m, kernel_size=3, stride=1, padding=1)
    return m.reshape(p, b * c * d, a).transpose(1, 2).reshape(p, a, b, c, d)


def copeak_mask(ts: Tensor) -> Tensor:
    """Co-peaks: 3×3×3×3 local maxima (ties count) that are ≥ the pair's median.

    Args:
        ts: float[P,h,w,h,w] saliency-guided correlation Tˢ.

    Returns:
        bool[P,h,w,h,w].
    """
    with torch.no_grad():
        flat = ts.reshape(ts.shape[0], -1)
        # MATLAB's median (the authors' code): the mean of the two middle values for even counts.
        med = torch.quantile(flat, 0.5, dim=1, interpolation="linear")
        return (ts >= local_max_4d(ts)) & (ts >= med.view(-1, 1, 1, 1, 1))


def saliency_correlation(fn: Tensor, fm: Tensor, sn: Tensor, sm: Tensor) -> Tensor:
    """Tˢ(p,q) = S̃_n(p)·S̃_m(q)·⟨F̂_n(p), F̂_m(q)⟩ (eq. 2).

    Args:
        fn, fm: float[P,C,h,w] normalised features of the two images of each pair.
        sn, sm: float[P,1,h,w] or [P,h,w] co-saliency S̃ in [0, 1].

    Returns:
        float[P,h,w,h,w].
    """
    t = torch.einsum("pcij,pckl->pijkl", fn, fm)
    sn3, sm3 = _as_maps(sn), _as_maps(sm)
    return sn3[:, :, :, None, None] * sm3[:, None, None, :, :] * t


def copeak_loss(fn: Tensor, fm: Tensor, sn: Tensor, sm: Tensor) -> Tensor:
    """Co-peak loss (eq. 3, authors' soft form): log(1 + exp(−v)), v = mean of Tˢ over co-peaks.

    Summed over the P pairs (eq. 1 sums ℓ_t over pairs). An empty co-peak set (only possible
    with NaN input) gives v = 0 instead of a division by zero.

    Args:
        fn, fm: float[P,C,h,w] normalised features (see `normalize_features`).
        sn, sm: float[P,1,h,w] or [P,h,w] co-saliency S̃ = sigmoid(logits).

    Returns:
        float scalar.
    """
    ts = saliency_correlation(fn, fm, sn, sm)
    mask = copeak_mask(ts).to(ts.dtype)
    count = mask.flatten(1).sum(dim=1)
    v = (ts * mask).flatten(1).sum(dim=1) / count.clamp(min=1.0)
    return F.softplus(-v).sum()


def affinity_loss(feats: Tensor, sal: Tensor, alpha: float) -> Tensor:
    """Affinity loss (eq. 4–5, corrected form) over every pixel pair of the batch.

    L_a = mean_{p,q}(S_p S_q (1 − P_pq)) + α·mean_{p,q}((S_p − S_q)² P_pq), P = F̂·F̂ᵀ,
    p and q ranging over all h·w cells of all B images (inter- and intra-image pairs).

    Args:
        feats: float[B,C,h,w] normalised features.
        sal: float[B,1,h,w] or [B,h,w] co-saliency S̃.
        alpha: α of eq. 4 (the config's `affinity_alpha`).

    Returns:
        float scalar.
    """
    x = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])  # [N,C]
    s = _as_maps(sal).reshape(-1)  # [N]
    p = x @ x.t()
    ss = s[:, None] * s[None, :]
    diff2 = (s[:, None] - s[None, :]) ** 2
    return (ss * (1.0 - p)).mean() + alpha * (diff2 * p).mean()


def saliency_weights(prior: Tensor) -> Tensor:
    """ρ of eq. 6: 1 − ε on pixels above the image's mean prior, ε elsewhere.

    ε is the salient fraction (pixels with Ŝ > mean(Ŝ)), per image, so both regions weigh the same.

    Args:
        prior: float[B,1,H,W] or [B,H,W] continuous prior Ŝ in [0, 1].

    Returns:
        float with prior's shape.
    """
    dims = tuple(range(1, prior.dim()))
    salient = prior > prior.mean(dim=dims, keepdim=True)
    eps = salient.to(prior.dtype).mean(dim=dims, keepdim=True)
    return torch.where(salient, 1.0 - eps, eps)


def saliency_loss(sal_full: Tensor, prior: Tensor) -> Tensor:
    """Weighted regression onto the continuous prior (eq. 6): Σ_b Σ_p ρ (S − Ŝ)² / (H·W).

    Args:
        sal_full: float[B,1,H,W] S = sigmoid(upsampled logits).
        prior: float[B,1,H,W] Ŝ in [0, 1], same size.

    Returns:
        float scalar, summed over the batch (eq. 1 sums ℓ_s over images).
    """
    if sal_full.shape != prior.shape:
        raise ValueError(f"saliency {tuple(sal_full.shape)} and prior {tuple(prior.shape)} differ")
    w = saliency_weights(prior)
    hw = prior.shape[-1] * prior.shape[-2]
    return (w * (sal_full - prior) ** 2).sum() / hw


def total_loss(feats: Tensor, logits: Tensor, priors: Tensor, *, lambda_copeak: float,
               lambda_affinity: float, alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """L = ℓ_s + λ_t·ℓ_t + λ_a·ℓ_a for one piecewise batch (eq. 1).

    Pairs are the first half of the batch against the second half (image i with i + B/2).

    Args:
        feats: float[B,C,h,w] raw head features, B even.
        logits: float[B,1,h,w] saliency logits.
        priors: float[B,1,H,W] continuous priors at the input size.
        lambda_copeak, lambda_affinity, alpha: λ_t and λ_a of eq. 1, α of eq. 4 (the config's
            `lambda_copeak`, `lambda_affinity`, `affinity_alpha`).

    Returns:
        (total scalar, {"saliency", "copeak", "affinity"} scalars, unweighted).
    """
    b = feats.shape[0]
    if b < 2 or b % 2:
        raise ValueError(f"a batch needs an even number >= 2 of images, got {b}")
    fhat = normalize_features(feats)
    s_tilde = torch.sigmoid(logits)
    s_full = torch.sigmoid(upsample_logits(logits, (priors.shape[-2], priors.shape[-1])))
    half = b // 2
    l_s = saliency_loss(s_full, priors)
    l_t = copeak_loss(fhat[:half], fhat[half:], s_tilde[:half], s_tilde[half:])
    l_a = affinity_loss(fhat, s_tilde, alpha)
    total = l_s + lambda_copeak * l_t + lambda_affinity * l_a
    return total, {"saliency": l_s, "copeak": l_t, "affinity": l_a}


__all__ = [
    "affinity_loss",
    "copeak_loss",
    "copeak_mask",
    "local_max_4d",
    "normalize_features",
    "saliency_correlation",
    "saliency_loss",
    "saliency_weights",
    "total_loss",
]

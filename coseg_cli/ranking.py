"""Stage 2b: score proposals against instance maps (paper eq. 7), pick one per peak, NMS, and the
folder-wide noise filter — all at the image's original resolution.

Matches the authors' RunInstMaskGen.m / NMS.m: R(P) = β·⟨O⊙S, P⟩ + ⟨O⊙S, contour(P)⟩ −
γ·⟨1−S, P⟩, argmax per peak, greedy NMS keeping IoU < thresh, then a percentile noise filter.
"""

from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils

# Masks flattened to float32 per matmul block: bounds memory to ~2·_BLOCK_ELEMS·4 bytes (≈256 MB)
_BLOCK_ELEMS = 1 << 25


def contour_band(masks: np.ndarray, px: int = 5) -> np.ndarray:
    """Boundary band of each mask: dilate(P, px×px) XOR erode(P, px×px).

    Outside the image counts as background for the dilation and foreground for the erosion
    (OpenCV's defaults, as MATLAB's imdilate/imerode), so a mask touching the border gets no
    band along the border.

    Args:
        masks: bool[N,H,W].
        px: side of the square structuring element (≥ 1; 1 gives an empty band).

    Returns:
        bool[N,H,W].
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"contour_band expects bool[N,H,W], got shape {masks.shape}")
    if px < 1:
        raise ValueError(f"contour_band: px must be >= 1, got {px}")
    out = np.zeros(masks.shape, dtype=bool)
    if masks.size == 0 or px == 1:
        return out
    kernel = np.ones((px, px), np.uint8)
    for i, m in enumerate(masks.view(np.uint8)):
        out[i] = cv2.dilate(m, kernel) != cv2.erode(m, kernel)
    return out


def _check_maps(instance_maps: np.ndarray, cosal: np.ndarray, masks: np.ndarray) -> None:
    if masks.ndim != 3:
        raise ValueError(f"masks must be bool[N,H,W], got shape {masks.shape}")
    hw = masks.shape[1:]
    if instance_maps.ndim != 3 or instance_maps.shape[1:] != hw or cosal.shape != hw:
        raise ValueError(f"instance maps {instance_maps.shape} and co-saliency {cosal.shape} must "
                         f"match the masks' size {hw}")


def score_proposals_batch(instance_maps: np.ndarray, cosal: np.ndarray, masks: np.ndarray, *,
                          beta: float = 0.8, gamma: float = 1e-5, contour_px: int = 5,
                          bands: np.ndarray | None = None) -> np.ndarray:
    """Eq. 7 for every (peak, proposal) pair, as matrix products.

    R(P) = β·Σ(O⊙S)⊙P + Σ(O⊙S)⊙contour(P) − γ·Σ(1−S)⊙P. Masks are flattened to float32 in
    blocks so memory stays bounded whatever N is.

    Args:
        instance_maps: float32[K,H,W] O per peak, already at the image's resolution.
        cosal: float32[H,W] co-saliency S in [0,1] at the same resolution.
        masks: bool[N,H,W] proposals.
        beta, gamma: the paper's β (0.8) and γ (1e-5).
        contour_px: side of the contour band's structuring element (5 in the paper).
        bands: bool[N,H,W] precomputed `contour_band(masks, contour_px)`, to reuse across calls.

    Returns:
        float32[K,N].
    """
    maps = np.asarray(instance_maps, dtype=np.float32)
    cosal = np.asarray(cosal, dtype=np.float32)
    masks = np.asarray(masks, dtype=bool)
    _check_maps(maps, cosal, masks)
    num_peaks, num_masks = maps.shape[0], masks.shape[0]
    if num_peaks == 0 or num_masks == 0:
        return np.zeros((num_peaks, num_masks), np.float32)
    if bands is None:
        bands = contour_band(masks, contour_px)
    elif bands.shape != masks.shape:
        raise ValueError(f"bands {bands.shape} must have the masks' shape {masks.shape}")
    hw = cosal.size
    # rows 0..K-1: O⊙S per peak; row K: the background map 1−S
    weights = np.concatenate([(maps * cosal).reshape(num_peaks, hw),
                              (1.0 - cosal).reshape(1, hw)])
    flat_masks = masks.reshape(num_masks, hw)
    flat_bands = np.asarray(bands, dtype=bool).reshape(num_masks, hw)
    scores = np.empty((num_peaks, num_masks), np.float32)
    step = max(1, _BLOCK_ELEMS // hw)
    for s in range(0, num_masks, step):
        inside = weights @ flat_masks[s:s + step].T.astype(np.float32)  # [K+1, n]
        band = weights[:num_peaks] @ flat_bands[s:s + step].T.astype(np.float32)  # [K, n]
        scores[:, s:s + step] = beta * inside[:num_peaks] + band - gamma * inside[num_peaks]
    return scores


def score_proposals(instance_map: np.ndarray, cosal: np.ndarray, masks: np.ndarray, *,
                    beta: float = 0.8, gamma: float = 1e-5, contour_px: int = 5,
                    bands: np.ndarray | None = None) -> np.ndarray:
    """Eq. 7 for one peak: `score_proposals_batch` with K = 1.

    Args:
        instance_map: float32[H,W] O. cosal: float32[H,W] S in [0,1]. masks: bool[N,H,W].

    Returns:
        float32[N].
    """
    return score_proposals_batch(np.asarray(instance_map)[None], cosal, masks, beta=beta,
                                 gamma=gamma, contour_px=contour_px, bands=bands)[0]


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact mask IoU via COCO RLE (memory ∝ boundary, not area); 0 where both are empty.

    Args:
        a: bool[N,H,W]. b: bool[M,H,W].

    Returns:
        float64[N,M].
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float64)
    rle_a = mask_utils.encode(np.asfortranarray(np.asarray(a, np.uint8).transpose(1, 2, 0)))
    rle_b = mask_utils.encode(np.asfortranarray(np.asarray(b, np.uint8).transpose(1, 2, 0)))
    iou = mask_utils.iou(rle_a, rle_b, [0] * len(rle_b))
    return np.asarray(iou, np.float64).reshape(len(a), len(b))


def select_instances(scores: np.ndarray, masks: np.ndarray, *,
                     nms_iou_thresh: float = 0.4) -> list[tuple[int, int, float]]:
    """Each peak takes its best proposal; then greedy mask-IoU NMS by score.

    A candidate is kept only if its IoU with every kept one is < `nms_iou_thresh` (authors'
    NMS.m), so peaks that chose the same proposal (IoU 1) keep only the best-scoring one.
    Ties: the lowest proposal index wins per peak; equal scores keep peak order.

    Args:
        scores: float32[K,N] from `score_proposals_batch`.
        masks: bool[N,H,W] the proposals scored.
        nms_iou_thresh: IoU at or above which the lower-scored candidate is dropped.

    Returns:
        [(peak_index, proposal_index, score)] kept, by score descending (index = rank − 1).
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 2 or scores.shape[1] != len(masks):
        raise ValueError(f"scores {scores.shape} must be [K,N] with N = {len(masks)} masks")
    num_peaks, num_masks = scores.shape
    if num_peaks == 0 or num_masks == 0:
        return []
    if np.isnan(scores).any():
        raise ValueError("select_instances: scores hold NaN")
    best = scores.argmax(axis=1)
    best_scores = scores[np.arange(num_peaks), best]
    order = np.argsort(-best_scores, kind="stable")
    # IoU among the distinct chosen proposals only (several peaks often pick the same one)
    uniq, inverse = np.unique(best, return_inverse=True)
    iou = mask_iou(masks[uniq], masks[uniq])
    kept: list[int] = []
    for k in order:
        u = inverse[k]
        if all(iou[u, inverse[j]] < nms_iou_thresh for j in kept):
            kept.append(int(k))
    return [(k, int(best[k]), float(best_scores[k])) for k in kept]


def noise_filter(scores_per_image: list[np.ndarray], percentile: float = 20.0) -> list[np.ndarray]:
    """Folder-wide filter: drop instances scoring below the folder's `percentile`.

    The threshold is taken over all instance scores of the folder with MATLAB's `prctile`
    definition (numpy method "hazen"), as the authors' NoiseFilter; scores ≥ it survive. An image
    whose instances would all be dropped keeps its best one.

    Args:
        scores_per_image: per image, float32[k_i] scores of its instances (k_i may be 0).
        percentile: in [0, 100).

    Returns:
        per image, bool[k_i] keep flags.
    """
    arrays = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores_per_image]
    if not arrays or sum(a.size for a in arrays) == 0:
        return [np.zeros(a.size, bool) for a in arrays]
    thresh = np.percentile(np.concatenate(arrays), percentile, method="hazen")
    keeps = []
    for a in arrays:
        keep = a >= thresh
        if a.size and not keep.any():
            keep[np.argmax(a)] = True
        keeps.append(keep)
    return keeps

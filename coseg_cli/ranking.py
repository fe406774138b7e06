"""Stage 2b: score proposals against instance maps (paper eq. 7), pick one per peak, NMS, and the
folder-wide noise filter — all at working resolution (the image with its longer side capped at
`work_max_side`, as the proposals are); the pipeline maps the kept masks back to the image's size.

Matches the authors' RunInstMaskGen.m / NMS.m: R(P) = β·⟨O⊙S, P⟩ + ⟨O⊙S, contour(P)⟩ −
γ·⟨1−S, P⟩, argmax per peak, greedy NMS keeping IoU < thresh, then a percentile noise filter.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .coco import mask_iou
from .config import COMMON_AGGREGATES

# Masks are scanned for row runs this many pixels at a time: bounds the temporary memory to
# about _BLOCK_ELEMS bytes (≈32 MB)
_BLOCK_ELEMS = 1 << 25


def contour_band(masks: np.ndarray, px: int) -> np.ndarray:
    """Boundary band of each mask: dilate(P, px×px) XOR erode(P, px×px).

    Outside the image counts as background for the dilation and foreground for the erosion
    (OpenCV's defaults, as MATLAB's imdilate/imerode), so a mask touching the border gets no
    band along the border.

    Args:
        masks: bool[N,H,W].
        px: side of the square structuring element (≥ 1; 1 gives an empty band), the config's
            `contour_px` in the pipeline.

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
    h, w = masks.shape[1:]
    rows_any = masks.any(axis=2)
    cols_any = masks.any(axis=1)
    for i, m in enumerate(masks.view(np.uint8)):
        ys, xs = np.flatnonzero(rows_any[i]), np.flatnonzero(cols_any[i])
        if ys.size == 0:
            continue
        # work on the bounding box plus a px margin: the band cannot reach further, and inside
        # the image the margin is background, so crop edges behave like the unbounded image
        y0, y1 = max(0, ys[0] - px), min(h, ys[-1] + px + 1)
        x0, x1 = max(0, xs[0] - px), min(w, xs[-1] + px + 1)
        crop = m[y0:y1, x0:x1]
        out[i, y0:y1, x0:x1] = cv2.dilate(crop, kernel) != cv2.erode(crop, kernel)
    return out


def _check_maps(instance_maps: np.ndarray, cosal: np.ndarray, masks: np.ndarray) -> None:
    if masks.ndim != 3:
        raise ValueError(f"masks must be bool[N,H,W], got shape {masks.shape}")
    hw = masks.shape[1:]
    if instance_maps.ndim != 3 or instance_maps.shape[1:] != hw or cosal.shape != hw:
        raise ValueError(f"instance maps {instance_maps.shape} and co-saliency {cosal.shape} must "
                         f"match the masks' size {hw}")


def _row_runs(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True in each mask: (mask index, row, first col, one-past-last col).

    Transitions along each row (with False outside both ends) alternate start, end, start, …, so
    the flat, sorted positions of `m[x] != m[x-1]` pair up directly.
    """
    num, h, w = masks.shape
    step = max(1, _BLOCK_ELEMS // max(1, h * (w + 1)))
    idx_parts, row_parts, start_parts, end_parts = [], [], [], []
    for s in range(0, num, step):
        block = masks[s:s + step]
        edges = np.empty((block.shape[0], h, w + 1), dtype=bool)
        edges[:, :, 0] = block[:, :, 0]
        edges[:, :, w] = block[:, :, w - 1]
        np.not_equal(block[:, :, 1:], block[:, :, :-1], out=edges[:, :, 1:w])
        flat = np.flatnonzero(edges)
        starts, ends = flat[0::2], flat[1::2]
        idx_parts.append(starts // (h * (w + 1)) + s)
        row_parts.append((starts // (w + 1)) % h)
        start_parts.append(starts % (w + 1))
        end_parts.append(ends % (w + 1))
    return (np.concatenate(idx_parts), np.concatenate(row_parts), np.concatenate(start_parts),
            np.concatenate(end_parts))


def _sums_over_masks(cum: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Σ over each mask's pixels of every channel of a map, from row-wise prefix sums.

    Args:
        cum: float64[H,W+1,C], cum[y,x] = Σ_{x' < x} map[y,x']. masks: bool[N,H,W].

    Returns:
        float64[N,C]: cost ∝ number of row runs, not pixels, once the runs are found.
    """
    idx, rows, x0, x1 = _row_runs(masks)
    vals = cum[rows, x1] - cum[rows, x0]  # [R,C]
    return np.stack([np.bincount(idx, weights=vals[:, c], minlength=len(masks))
                     for c in range(cum.shape[2])], axis=1)


def score_proposals_batch(instance_maps: np.ndarray, cosal: np.ndarray, masks: np.ndarray, *,
                          beta: float, gamma: float, contour_px: int,
                          bands: np.ndarray | None = None) -> np.ndarray:
    """Eq. 7 for every (peak, proposal) pair.

    R(P) = β·Σ(O⊙S)⊙P + Σ(O⊙S)⊙contour(P) − γ·Σ(1−S)⊙P. Rather than flattening masks to floats
    (a 1000×480×640 float matrix is 1.2 GB and slow to build), each mask is read once as row runs
    and every map's sum over it comes from row-wise prefix sums (float64): the cost is one scan
    of the masks and bands plus O(runs × K), so adding peaks is nearly free.

    Args:
        instance_maps: float32[K,H,W] O per peak, already at the masks' resolution.
        cosal: float32[H,W] co-saliency S in [0,1] at the same resolution.
        masks: bool[N,H,W] proposals.
        beta, gamma: β and γ of eq. 7 (the config's `rank_beta`, `rank_gamma`).
        contour_px: side of the contour band's structuring element (`contour_px`).
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
    h, w = cosal.shape
    # channels 0..K-1: O⊙S per peak; channel K: the background map 1−S
    chans = np.concatenate([maps * cosal[None], (1.0 - cosal)[None]]).astype(np.float64)
    cum = np.zeros((h, w + 1, num_peaks + 1), np.float64)
    np.cumsum(chans.transpose(1, 2, 0), axis=1, out=cum[:, 1:])
    inside = _sums_over_masks(cum, masks)  # [N,K+1]
    band = _sums_over_masks(cum[:, :, :num_peaks], np.asarray(bands, dtype=bool))  # [N,K]
    scores = beta * inside[:, :num_peaks] + band - gamma * inside[:, num_peaks:]
    return scores.T.astype(np.float32)


def select_instances(scores: np.ndarray, masks: np.ndarray, *,
                     nms_iou_thresh: float) -> list[tuple[int, int, float]]:
    """Each peak takes its best proposal; then greedy mask-IoU NMS by score.

    A candidate is kept only if its IoU with every kept one is < `nms_iou_thresh` (authors'
    NMS.m), so peaks that chose the same proposal (IoU 1) keep only the best-scoring one.
    Ties: the lowest proposal index wins per peak; equal scores keep peak order.

    Args:
        scores: float32[K,N] from `score_proposals_batch`.
        masks: bool[N,H,W] the proposals scored.
        nms_iou_thresh: IoU at or above which the lower-scored candidate is dropped (the
            config's `nms_iou_thresh`).

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
    chosen = masks[uniq]
    iou = mask_iou(chosen, chosen)
    kept: list[int] = []
    for k in order:
        u = inverse[k]
        if all(iou[u, inverse[j]] < nms_iou_thresh for j in kept):
            kept.append(int(k))
    return [(k, int(best[k]), float(best_scores[k])) for k in kept]


def nms_by_iou(scores: np.ndarray, iou: np.ndarray, *, iou_thresh: float, max_keep: int
               ) -> np.ndarray:
    """Greedy NMS on a precomputed IoU table: best score first, keep a candidate if its IoU with
    every kept one is < `iou_thresh`, stop after `max_keep`.

    Args:
        scores: float[N]. iou: float[N,N] pairwise IoU of the candidates.

    Returns:
        int64[K] kept indices, by score descending (ties: lower index first).
    """
    scores = np.asarray(scores, np.float64)
    if iou.shape != (len(scores), len(scores)):
        raise ValueError(f"IoU table {iou.shape} for {len(scores)} scores")
    kept: list[int] = []
    for a in np.argsort(-scores, kind="stable"):
        if len(kept) == max_keep:
            break
        if all(iou[a, b] < iou_thresh for b in kept):
            kept.append(int(a))
    return np.array(kept, np.int64)


def noise_threshold(scores_per_image: Sequence[np.ndarray], percentile: float) -> float | None:
    """The noise filter's level: the folder's `percentile` of all its instance scores, with
    MATLAB's `prctile` definition (numpy method "hazen"), as the authors' NoiseFilter.

    Args:
        scores_per_image: per image, float[k_i] scores of its instances (k_i may be 0).
        percentile: in [0, 100].

    Returns:
        The level, or None when the folder has no instance.
    """
    flat = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores_per_image]
    if sum(a.size for a in flat) == 0:
        return None
    return float(np.percentile(np.concatenate(flat), percentile, method="hazen"))


def noise_filter(scores_per_image: list[np.ndarray], percentile: float) -> list[np.ndarray]:
    """Folder-wide filter: drop instances scoring below the folder's `percentile`.

    Scores ≥ `noise_threshold` survive. An image whose instances would all be dropped keeps its
    best one.

    Args:
        scores_per_image: per image, float32[k_i] scores of its instances (k_i may be 0).
        percentile: in [0, 100), the config's `noise_percentile`.

    Returns:
        per image, bool[k_i] keep flags.
    """
    arrays = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores_per_image]
    thresh = noise_threshold(arrays, percentile)
    if thresh is None:
        return [np.zeros(a.size, bool) for a in arrays]
    keeps = []
    for a in arrays:
        keep = a >= thresh
        if a.size and not keep.any():
            keep[np.argmax(a)] = True
        keeps.append(keep)
    return keeps


def consensus_scores(embeddings: list[np.ndarray]) -> list[np.ndarray]:
    """`commonness` (mean over the other images) with every image's instances as its own seeds
    (the "peaks" ranking's re-scoring of the instances that survived the noise filter).

    Args:
        embeddings: per image, float32[k_i,C] unit-norm instance features (k_i may be 0).

    Returns:
        per image, float64[k_i] in [0, 1].
    """
    return commonness(embeddings, embeddings, "mean")


def commonness(embeddings: list[np.ndarray], seeds: list[np.ndarray], aggregate: str
               ) -> list[np.ndarray]:
    """How well each candidate's feature is matched in the *other* images of the folder.

    Co-segmentation's premise: the category recurs across the group, clutter does not. Per
    candidate, its best cosine similarity to each other image's seeds (that image's most
    co-salient candidates), aggregated over those images (the images without seeds do not
    vote), clipped at 0; 1 when no other image has seeds. "median" asks how well a typical other
    image matches: clutter that recurs in a few photos (people, tables) scores high in those
    only, and lifts a mean more than a median.

    Args:
        embeddings: per image, float32[k_i,C] unit-norm candidate features (k_i may be 0).
        seeds: per image, float32[s_i,C] unit-norm features of that image's seeds.
        aggregate: "mean" or "median" over the other images (the config's
            `common_aggregate`).

    Returns:
        per image, float64[k_i] in [0, 1].
    """
    if aggregate not in COMMON_AGGREGATES:
        raise ValueError(f"aggregate must be one of {COMMON_AGGREGATES}, got {aggregate!r}")
    reduce = np.mean if aggregate == "mean" else np.median
    seed_mats = [np.asarray(e, np.float64) for e in seeds]
    out = []
    for a, emb in enumerate(embeddings):
        ea = np.asarray(emb, np.float64)
        best = [(ea @ sb.T).max(axis=1) for b, sb in enumerate(seed_mats)
                if b != a and len(sb) and len(ea)]
        out.append(np.clip(reduce(best, axis=0), 0.0, 1.0) if best else np.ones(len(ea)))
    return out


def ddt_direction(feature_maps: Sequence[np.ndarray], anchors: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """The folder's common-object direction, after DDT (Deep Descriptor Transforming, Wei et
    al., IJCAI 2017): the first principal component of every grid cell's descriptor over all
    images of the folder. What varies most across a folder of one category is whether a cell
    shows a thing of it or not, so a descriptor's projection on it, around the folder's mean,
    is positive on one side and negative on the other. The sign is DDT's open question: here
    the side on which `anchors` (each image's most co-salient candidates) lie on average is
    positive — what the fine-tuned network finds co-salient says which side holds the object,
    whatever its size; without anchors (or a tie), the side with fewer cells (an object covers
    less of a photo than the rest).

    Sums are accumulated image by image (float64), so memory does not grow with the folder
    beyond the maps themselves.

    Args:
        feature_maps: per image, float[L_i,C] descriptors, one row per grid cell (L_i may be 0).
        anchors: float[K,C] descriptors that should project positively (K may be 0).

    Returns:
        (mean float64[C], unit direction float64[C]), or None when no image has a cell.
    """
    maps = [m for m in feature_maps if len(m)]
    if not maps:
        return None
    count = sum(len(m) for m in maps)
    total = np.zeros(maps[0].shape[1])
    scatter = np.zeros((maps[0].shape[1],) * 2)
    for m in maps:
        m64 = np.asarray(m, np.float64)
        total += m64.sum(axis=0)
        scatter += m64.T @ m64
    mean = total / count
    _, vecs = np.linalg.eigh(scatter / count - np.outer(mean, mean))
    direction = vecs[:, -1]
    side = float(ddt_indicator(anchors, mean, direction).mean()) if len(anchors) else 0.0
    if side == 0.0:
        side = count - 2 * sum(int((ddt_indicator(m, mean, direction) > 0).sum()) for m in maps)
    return mean, (direction if side > 0 else -direction)


def ddt_indicator(descriptors: np.ndarray, mean: np.ndarray, direction: np.ndarray
                  ) -> np.ndarray:
    """float64[M]: each descriptor's projection on the DDT direction around the folder's mean
    (`ddt_direction`); for a mask's mean descriptor, the mean of DDT's indicator map inside it.

    Args:
        descriptors: float[M,C].
    """
    return (np.asarray(descriptors, np.float64).reshape(-1, len(mean)) - mean) @ direction

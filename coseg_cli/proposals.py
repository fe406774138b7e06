"""Mask proposals: an offline, unsupervised replacement for MCG.

DeepCO3 ranks candidate masks (MCG in the paper, MATLAB only) with its co-saliency maps, so the
instances it can return are bounded by the candidates' recall. The default source here,
``hierarchical``, is selective search (Uijlings et al., IJCV 2013) made to emit *masks*:

1. Felzenszwalb graph segmentations (OpenCV ximgproc) of the image in several colour spaces and
   scales, at a working resolution whose longer side is at most ``work_max_side``.
2. For each (segmentation, similarity) strategy, greedy merging of the most similar adjacent pair
   of regions by colour-histogram, texture-histogram, size and fill similarity; every region of
   the hierarchy (base regions and every merge) is a candidate.
3. Groupings of adjacent regions: pairs and triples of touching regions of hierarchy cuts with few
   regions (MCG's combinatorial grouping, which recovers objects the greedy order never formed).
4. With a saliency prior: the prior thresholded at several levels, whole and per connected
   component, snapped to the atoms below.

Every candidate is a union of *atoms*, the cells of the overlay of all base segmentations, so
areas, duplicates and overlaps are computed on small membership matrices instead of pixel masks.
The kept proposals are returned that way too (`ProposalSet`: the atom map at the image's
resolution, nearest-neighbour, and each proposal's atoms); masks are painted where used.

Score (higher first): a weighted-sampling key u^(1/w) (Efraimidis–Spirakis, u uniform from a
seeded generator) with weight w = size prior × (stability + 0.05) × (boundary edge strength + 0.2).
*Stability* is the similarity at which a region was formed minus the similarity at which it is
absorbed into a larger one (a region that persists over a wide range of merging thresholds has a
coherent inside and a strong boundary, the idea behind MCG's ultrametric contours); base regions
are formed at 1, groupings at 0. *Edge strength* is the mean Lab gradient along the candidate's
boundary. The size prior downweights tiny (< 0.1 % of the image) and huge (> 10 %) candidates.
Sorting by the key draws the top-k as a weighted sample without replacement; deterministic
orderings by any of these cues filled the top-k with near-identical small regions and recalled
fewer objects (numbers in `_score`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from scipy import ndimage, sparse

from . import coco
from .config import CosegConfig
from .errors import ConfigError
from .images import as_rgb3, shrink_to
from .records import ProposalSet

# Config fields that change a proposal set (its cache key also holds the prior's key: the
# thresholded-prior candidates depend on the prior).
CONFIG_FIELDS = ("proposal_method", "max_proposals", "min_area_frac", "max_area_frac",
                 "work_max_side", "seed")

# Selective-search strategies: (colour space, Felzenszwalb k, similarity weights colour, texture,
# size, fill). Colour spaces and k follow the paper's "fast" mode, widened with RGB and k = 200.
_Strategy = tuple[str, int, tuple[float, float, float, float]]
HIERARCHICAL_STRATEGIES: tuple[_Strategy, ...] = (
    ("hsv", 50, (1.0, 1.0, 1.0, 1.0)),
    ("hsv", 50, (0.0, 1.0, 1.0, 1.0)),
    ("lab", 50, (1.0, 1.0, 1.0, 1.0)),
    ("lab", 50, (0.0, 1.0, 1.0, 1.0)),
    ("hsv", 100, (1.0, 1.0, 1.0, 1.0)),
    ("lab", 100, (1.0, 1.0, 1.0, 1.0)),
    ("rgb", 100, (1.0, 1.0, 1.0, 1.0)),
    ("rgb", 200, (1.0, 1.0, 1.0, 1.0)),
)
_GRAPH_SIGMA = 0.8  # Felzenszwalb's smoothing, as in selective search
_COLOUR_BINS = 25  # selective search: 25 bins per colour channel
_ORIENT_BINS = 8  # selective search: 8 derivative orientations ...
_MAG_BINS = 4  # ... here × 4 log-magnitude bins per channel (SS uses 10 value bins)
_GROUP_CUTS = (8, 16)  # region counts of the hierarchy cuts whose adjacent pairs/triples are kept
_PRIOR_LEVELS = (0.2, 0.35, 0.5, 0.65, 0.8)
_DEDUP_IOU_THRESH = 0.95  # near-duplicates (issue 4); 0.8 was tried: same recall, 30 % slower
_MIN_WORK_PIXELS = 16
# Size prior (see _area_weight): weight at log10(area / image) knots.
_AREA_LOG10 = (-5.0, -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0)
_AREA_WEIGHT = (0.01, 0.02, 0.2, 0.6, 1.0, 1.0, 1.0, 0.6, 0.2, 0.05)
_MAX_MASK_BYTES = 1 << 30  # cap on N·H·W of the returned masks (1 GiB; 12 MP photos keep ≤ 89)
_PRIOR_STABILITY = 0.2
_NEAR_DUP_POOL = 6  # near-duplicates are searched among the best 6 × max_proposals candidates
_DENSE_UNIQUE_MAX = 1 << 24  # table entries of `_dense_unique` (16 MB of flags, 64 MB of ranks)


@dataclass
class _Candidates:
    """Candidates as unions of atoms, stored per source over its own base regions (internal).

    Row i of part p is the union of the atoms whose region (``lookup`` of p) it contains; atom
    rows are built only for the few thousand candidates that reach duplicate removal, which saves
    copying a bool[~12k, ~12k] matrix several times per image (≈ 3 s of the 5.4 s CPU before).
    """

    parts: list[tuple[np.ndarray, np.ndarray]]  # (bool[R_p, K_p], int64[A] atom → region of p)
    areas: np.ndarray  # float32[N] pixels at work resolution
    boxes_xyxy: np.ndarray  # float32[N, 4] at work resolution, inclusive max
    stability: np.ndarray  # float32[N] formation minus absorption similarity
    sources: list[str]
    edge: np.ndarray | None = None  # float32[N] mean edge strength along the boundary
    level: np.ndarray | None = None  # float32[N] merge step / (K-1); 0 for base regions
    strategy: np.ndarray | None = None  # int64[N] index into the strategies

    def member_rows(self, idx: np.ndarray) -> sparse.csr_matrix:
        """float32[len(idx), A] atom membership (1.0) of the candidates `idx`, in that order, as
        canonical CSR rows: built region → atom by a sparse product, so the cost follows the
        memberships (~10⁶), not len(idx) × A (~6·10⁷ for a dense matrix and its scan)."""
        starts = np.cumsum([0] + [m.shape[0] for m, _ in self.parts])
        num_atoms = self.parts[0][1].size
        blocks, order = [], []
        for p, (m, lookup) in enumerate(self.parts):
            sel = np.flatnonzero((idx >= starts[p]) & (idx < starts[p + 1]))
            if sel.size:
                to_atoms = sparse.csr_matrix(
                    (np.ones(num_atoms, np.float32), (lookup, np.arange(num_atoms))),
                    shape=(m.shape[1], num_atoms))
                blocks.append(sparse.csr_matrix(m[idx[sel] - starts[p]], dtype=np.float32)
                              @ to_atoms)
                order.append(sel)
        if not blocks:
            return sparse.csr_matrix((idx.size, num_atoms), dtype=np.float32)
        rows = sparse.vstack(blocks, format="csr")
        rows = rows[np.argsort(np.concatenate(order), kind="stable")]
        rows.sum_duplicates()  # canonical: sorted column indices, each stored once
        return rows

    def keys(self) -> np.ndarray:
        """float64[N] exact set hashes: equal atom sets ↔ equal keys (up to ~2^-31 collisions).

        Each atom gets a random integer < 2^31, a region the sum over its atoms and a candidate
        the sum over its regions; sums stay < 2^53, so floating point is exact and BLAS is used.
        """
        num_atoms = self.parts[0][1].size
        atom_w = np.random.default_rng(12345).integers(0, 1 << 31, num_atoms).astype(np.float64)
        out = []
        for m, lookup in self.parts:
            region_w = np.bincount(lookup, weights=atom_w, minlength=m.shape[1])
            out.append(m.astype(np.float64) @ region_w)
        return np.concatenate(out) if out else np.zeros(0)


# --- working image and base segmentations -------------------------------------------------------


def _work_image(image: np.ndarray, work_max_side: int) -> np.ndarray:
    """uint8[H,W] or [H,W,3|4] → uint8[h,w,3] RGB with max(h, w) ≤ work_max_side."""
    rgb = as_rgb3(image, ConfigError, "image").astype(np.uint8, copy=False)
    return shrink_to(rgb, work_max_side)


def _colour(image: np.ndarray, space: str) -> np.ndarray:
    if space == "rgb":
        return image
    if space == "hsv":
        return cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)  # hue over 0..255
    if space == "lab":
        return cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    raise ConfigError(f"unknown colour space {space!r}")


def _graph_segment(image: np.ndarray, k: int) -> np.ndarray:
    """Felzenszwalb–Huttenlocher segmentation → int32[h,w] labels 0..K-1 (contiguous)."""
    seg = cv2.ximgproc.segmentation.createGraphSegmentation(sigma=_GRAPH_SIGMA, k=float(k),
                                                            min_size=k)
    labels = seg.processImage(image)
    # OpenCV numbers its regions 0..K-1 already; checking that (one bincount) is ~20× cheaper
    # than renumbering with np.unique, which stays as the fallback
    if labels.size and labels.min() >= 0 and np.bincount(labels.ravel()).all():
        return labels.astype(np.int32, copy=False)
    _, inv = np.unique(labels, return_inverse=True)
    return inv.reshape(labels.shape).astype(np.int32)


# --- region features ----------------------------------------------------------------------------


def _pixel_bins(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's colour and texture histogram bins, per channel, offset by channel: computed
    once per colour space and shared by the segmentations (k) of that space.

    Returns:
        colour int64[h·w,3] in 0..74, texture int64[h·w,3] in 0..95.
    """
    chans = img.reshape(-1, 3).astype(np.int64)
    cbin = (chans * _COLOUR_BINS) >> 8  # 0..24
    colour = np.arange(3) * _COLOUR_BINS + cbin
    f = img.astype(np.float32)
    gx = cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3).reshape(-1, 3)
    gy = cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3).reshape(-1, 3)
    ang = (np.arctan2(gy, gx) + np.pi) * (_ORIENT_BINS / (2 * np.pi))
    obin = np.minimum(ang.astype(np.int64), _ORIENT_BINS - 1)
    mag = np.sqrt(gx * gx + gy * gy)
    mbin = np.clip(np.log2(mag + 1.0) * (_MAG_BINS / 11.0), 0, _MAG_BINS - 1).astype(np.int64)
    per = _ORIENT_BINS * _MAG_BINS
    return colour, np.arange(3) * per + obin * _MAG_BINS + mbin


def _region_features(labels: np.ndarray, bins: tuple[np.ndarray, np.ndarray], num: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-region L1-normalised colour and texture histograms, sizes and boxes.

    Args:
        labels: int32[h,w] regions 0..num-1. bins: `_pixel_bins` of the segmented image.

    Returns:
        colour float32[K,75], texture float32[K,96], size float64[K],
        boxes int64[K,4] (x0, y0, x1, y1).
    """
    flat = labels.ravel().astype(np.int64)
    cbins, tbins = bins
    idx = flat[:, None] * (3 * _COLOUR_BINS) + cbins
    colour = np.bincount(idx.ravel(), minlength=num * 3 * _COLOUR_BINS).reshape(num, -1)
    colour = colour.astype(np.float32) / np.maximum(colour.sum(1, keepdims=True), 1)

    per = _ORIENT_BINS * _MAG_BINS
    tidx = flat[:, None] * (3 * per) + tbins
    texture = np.bincount(tidx.ravel(), minlength=num * 3 * per).reshape(num, -1)
    texture = texture.astype(np.float32) / np.maximum(texture.sum(1, keepdims=True), 1)

    size = np.bincount(flat, minlength=num).astype(np.float64)
    # find_objects is one C pass; np.unique-based first/last indices cost 4 sorts per map.
    slices = ndimage.find_objects(labels + 1, max_label=num)
    boxes = np.array([(sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1)
                      for sl in slices], np.int64).reshape(num, 4)
    return colour, texture, size, boxes


def _dense_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(values, return_inverse=True) for non-negative int64[n], inverse as int64[n].

    Label pairs give values below (labels) × (labels), a few million at most, so marking them
    in a table and counting replaces np.unique's sort of every pixel (~10× faster); the sort
    stays for a table too large to be worth it.
    """
    top = int(values.max(initial=0)) + 1
    if top > _DENSE_UNIQUE_MAX or top > 8 * values.size:
        uniq, inv = np.unique(values, return_inverse=True)
        return uniq, inv.ravel().astype(np.int64)
    seen = np.zeros(top, bool)
    seen[values] = True
    rank = np.cumsum(seen, dtype=np.int32) - 1
    return np.flatnonzero(seen), rank[values].astype(np.int64)


def _adjacency(labels: np.ndarray, num: int) -> np.ndarray:
    """Unique pairs (a < b) of 4-adjacent regions → int64[E,2]."""
    pairs = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        d = a != b
        pairs.append(np.stack([np.minimum(a[d], b[d]), np.maximum(a[d], b[d])], 1))
    p = np.concatenate(pairs).astype(np.int64)
    if p.size == 0:
        return np.zeros((0, 2), np.int64)
    key = _dense_unique(p[:, 0] * num + p[:, 1])[0]
    return np.stack([key // num, key % num], 1)


# --- hierarchical grouping ----------------------------------------------------------------------


@dataclass
class _Hierarchy:
    members: np.ndarray  # bool[R, K] base regions of each hierarchy region (R = 2K - 1 at most)
    stability: np.ndarray  # float32[R]
    boxes: np.ndarray  # int64[R, 4]
    areas: np.ndarray  # float64[R] pixels at work resolution
    group_members: np.ndarray  # bool[G, K] adjacent pairs/triples of hierarchy cuts
    group_areas: np.ndarray  # float64[G]
    group_boxes: np.ndarray  # int64[G, 4]


def _merge(colour: np.ndarray, texture: np.ndarray, size: np.ndarray, boxes: np.ndarray,
           edges: np.ndarray, weights: tuple[float, float, float, float], image_size: float
           ) -> _Hierarchy:
    """Greedy selective-search merging; records every region, its stability and cut groupings.

    One piece: the merge loop (the hot path of proposal generation) updates eight per-region
    tables (histograms, size, box, members, formed/absorbed similarity, alive, neighbours),
    several of which `sim` reads through its closure; split up, every part would pass them all.
    Colour and texture histograms share one table so that a merge averages, and `sim` compares,
    both in one operation.
    """
    num = size.shape[0]
    total = 2 * num - 1
    wc, wt, ws, wf = weights
    ncol = colour.shape[1]
    hist = np.zeros((total, ncol + texture.shape[1]), np.float32)
    hist[:num, :ncol], hist[:num, ncol:] = colour, texture
    sz = np.zeros(total)
    sz[:num] = size
    bx = np.zeros((total, 4), np.int64)
    bx[:num] = boxes
    formed = np.ones(total, np.float32)
    absorbed = np.zeros(total, np.float32)
    members = np.zeros((total, num), bool)
    members[np.arange(num), np.arange(num)] = True
    norm = wc + wt + ws + wf
    # the histogram part `sim` reads: colour and texture, or texture alone when wc is 0
    lo = 0 if wc else ncol

    def sim(i: int | np.ndarray, js: np.ndarray) -> np.ndarray:
        """Similarity of region(s) i to each region in js: the weighted sum of selective
        search's four terms (histogram intersections, size, fill), over the weights' sum."""
        both = sz[i] + sz[js]
        inter = np.minimum(hist[i, lo:], hist[js, lo:]) if wc or wt else hist[:0]
        s = (wc * inter[:, :ncol].sum(1)).astype(np.float64) if wc else np.zeros(js.size)
        if wt:
            s += wt * inter[:, ncol - lo:].sum(1)
        if ws:
            s += ws * (1.0 - both / image_size)
        if wf:
            bj = bx[js]
            wh = np.maximum(bx[i, 2:], bj[:, 2:]) - np.minimum(bx[i, :2], bj[:, :2]) + 1
            s += wf * (1.0 - (wh[:, 0] * wh[:, 1] - both) / image_size)
        return s / norm

    neighbours: list[set[int]] = [set() for _ in range(total)]
    heap: list[tuple[float, int, int]] = []
    if edges.shape[0]:
        s0 = sim(edges[:, 0], edges[:, 1])  # every adjacent pair of base regions at once
        for (i, j), s in zip(edges.tolist(), s0.tolist()):
            neighbours[i].add(j)
            neighbours[j].add(i)
            heap.append((-s, i, j))
        heapq.heapify(heap)
    alive = [True] * num + [False] * (total - num)  # a list: read once per heap entry
    cut_groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    nxt = num
    cuts = set(_GROUP_CUTS)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        negs, i, j = pop(heap)
        if not (alive[i] and alive[j]):
            continue
        s, t = -negs, nxt
        nxt += 1
        absorbed[i] = absorbed[j] = s
        formed[t] = s
        sz[t] = sz[i] + sz[j]
        hist[t] = (hist[i] * sz[i] + hist[j] * sz[j]) / sz[t]
        bx[t, :2] = np.minimum(bx[i, :2], bx[j, :2])
        bx[t, 2:] = np.maximum(bx[i, 2:], bx[j, 2:])
        np.logical_or(members[i], members[j], out=members[t])
        alive[i] = alive[j] = False
        alive[t] = True
        nb = (neighbours[i] | neighbours[j]) - {i, j}
        neighbours[t] = nb
        for n in nb:
            neighbours[n].discard(i)
            neighbours[n].discard(j)
            neighbours[n].add(t)
        if nb:
            js = np.fromiter(nb, np.int64, len(nb))
            # t is the newest region, so every pair is (n, t) with n < t
            for n, negsv in zip(js.tolist(), (-sim(t, js)).tolist()):
                push(heap, (negsv, n, t))
        num_alive = num - (nxt - num)
        if num_alive in cuts:
            cut_groups.append(_cut_groups(np.flatnonzero(alive[:nxt]), neighbours, members, sz,
                                          bx))
    used = nxt
    stability = formed[:used] - absorbed[:used]
    if cut_groups:
        gm, ga, gb = (np.concatenate(parts) for parts in zip(*cut_groups))
    else:
        gm, ga, gb = np.zeros((0, num), bool), np.zeros(0), np.zeros((0, 4), np.int64)
    return _Hierarchy(members[:used], stability.astype(np.float32), bx[:used], sz[:used].copy(),
                      gm, ga, gb)


def _cut_groups(alive: np.ndarray, neighbours: list[set[int]], members: np.ndarray,
                sizes: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unions of adjacent pairs and connected triples among the regions of one hierarchy cut.

    Returns:
        members bool[G,K], areas float64[G], boxes int64[G,4].
    """
    alive_set = set(alive.tolist())
    combos: set[tuple[int, ...]] = set()
    for r in alive.tolist():
        nb = sorted(n for n in neighbours[r] if n in alive_set)
        for n in nb:
            if n > r:
                combos.add((r, n))
        for x in range(len(nb)):  # triples centred on r
            for y in range(x + 1, len(nb)):
                combos.add(tuple(sorted((r, nb[x], nb[y]))))
    num = members.shape[1]
    if not combos:
        return np.zeros((0, num), bool), np.zeros(0), np.zeros((0, 4), np.int64)
    ordered = sorted(combos)
    idx = np.full((len(ordered), 3), -1, np.int64)
    for g, combo in enumerate(ordered):
        idx[g, :len(combo)] = combo
    valid = idx >= 0
    safe = np.where(valid, idx, idx[:, :1])  # a repeated first region is harmless in unions
    out = members[safe[:, 0]] | members[safe[:, 1]] | members[safe[:, 2]]
    areas = (sizes[safe] * valid).sum(1)
    bxs = boxes[safe]
    gboxes = np.concatenate([bxs[:, :, :2].min(1), bxs[:, :, 2:].max(1)], 1)
    return out, areas, gboxes


# --- the hierarchical method --------------------------------------------------------------------


def _atoms(label_maps: Sequence[np.ndarray]) -> tuple[np.ndarray, int, list[np.ndarray]]:
    """Overlay of segmentations → (atom map int64[h,w], A, per map int64[A] atom → label)."""
    key = np.zeros(label_maps[0].size, np.int64)
    for lab in label_maps:
        key = _dense_unique(key * (int(lab.max()) + 1) + lab.ravel())[1]
    num = int(key.max()) + 1
    first = np.zeros(num, np.int64)
    first[key[::-1]] = np.arange(key.size - 1, -1, -1)  # any pixel of each atom
    lookups = [lab.ravel()[first].astype(np.int64) for lab in label_maps]
    return key.reshape(label_maps[0].shape), num, lookups


def _hierarchical(work: np.ndarray, strategies: Sequence[_Strategy] = HIERARCHICAL_STRATEGIES
                  ) -> tuple[np.ndarray, _Candidates]:
    """Selective-search hierarchies + cut groupings as candidates over atoms.

    Args:
        work: uint8[h,w,3] RGB working image.
    """
    h, w = work.shape[:2]
    pairs = list(dict.fromkeys((space, k) for space, k, _ in strategies))  # first-use order
    images = {space: _colour(work, space) for space, _ in pairs}
    segs = {(space, k): _graph_segment(images[space], k) for space, k in pairs}
    bins = {space: _pixel_bins(img) for space, img in images.items()}
    atom_map, _, lookups = _atoms([segs[pair] for pair in pairs])
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]] = []
    levels: list[np.ndarray] = []
    strat: list[np.ndarray] = []
    edge_parts: list[np.ndarray] = []
    grad = _edge_map(work)
    feats: dict[tuple[str, int], tuple[np.ndarray, ...]] = {}
    for si, (space, k, weights) in enumerate(strategies):
        labels = segs[(space, k)]
        num = int(labels.max()) + 1
        if (space, k) not in feats:  # strategies sharing a segmentation share its features
            feats[(space, k)] = (*_region_features(labels, bins[space], num),
                                 _adjacency(labels, num))
        colour, texture, size, bxs, edges = feats[(space, k)]
        hier = _merge(colour, texture, size, bxs, edges, weights, float(h * w))
        lookup = lookups[pairs.index((space, k))]
        level = np.zeros(hier.members.shape[0], np.float32)
        level[num:] = np.arange(1, hier.members.shape[0] - num + 1) / max(num - 1, 1)
        edge_parts.append(_boundary_strength(labels, grad, num, hier.members, hier.group_members))
        g = hier.group_members.shape[0]
        parts.append((hier.members, lookup, hier.areas, hier.boxes, hier.stability, "hier"))
        levels.append(level)
        strat.append(np.full(level.size + g, si))
        if g:
            # Groupings were never formed by the greedy order: give them the stability of a
            # region formed and absorbed at the cut (0), below every region that persisted.
            parts.append((hier.group_members, lookup, hier.group_areas, hier.group_boxes,
                          np.zeros(g, np.float32), "group"))
            levels.append(np.full(g, -1.0, np.float32))
    cand = _Candidates(
        parts=[(p[0], p[1]) for p in parts],
        areas=np.concatenate([p[2] for p in parts]).astype(np.float32),
        boxes_xyxy=np.concatenate([p[3] for p in parts]).astype(np.float32),
        stability=np.concatenate([p[4] for p in parts]).astype(np.float32),
        sources=[tag for p in parts for tag in [p[5]] * p[0].shape[0]],
        edge=np.concatenate(edge_parts).astype(np.float32),
        level=np.concatenate(levels).astype(np.float32),
        strategy=np.concatenate(strat),
    )
    return atom_map, cand


def _edge_map(work: np.ndarray) -> np.ndarray:
    """Colour gradient magnitude in Lab after light smoothing, scaled to ~[0, 1] → float32[h,w]."""
    lab = cv2.cvtColor(cv2.GaussianBlur(work, (5, 5), 1.0), cv2.COLOR_RGB2LAB).astype(np.float32)
    gx = cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.sqrt((gx * gx + gy * gy).sum(2))
    scale = float(np.percentile(mag, 99)) if mag.size else 1.0
    return np.clip(mag / max(scale, 1e-6), 0.0, 1.0)


def _boundary_strength(labels: np.ndarray, grad: np.ndarray, num: int,
                       *member_sets: np.ndarray) -> np.ndarray:
    """Mean edge strength along each candidate's boundary with other regions (objectness cue).

    The strength of a pixel pair straddling two base regions is the larger gradient of the two;
    sums and counts per region pair make the per-candidate boundary mean a pair of matmuls.

    Args:
        labels: int32[h,w] base regions (K = num). grad: float32[h,w] in [0,1].
        member_sets: bool[R_i,K] candidates as unions of base regions.

    Returns:
        float32[ΣR_i]; 0 for a candidate without an inner boundary.
    """
    members = np.concatenate(member_sets)
    keys, vals = [], []
    for a, b, ga, gb in ((labels[:, :-1], labels[:, 1:], grad[:, :-1], grad[:, 1:]),
                         (labels[:-1, :], labels[1:, :], grad[:-1, :], grad[1:, :])):
        d = a != b
        keys.append(np.minimum(a[d], b[d]).astype(np.int64) * num + np.maximum(a[d], b[d]))
        vals.append(np.maximum(ga[d], gb[d]))
    key = np.concatenate(keys)
    if key.size == 0:
        return np.zeros(members.shape[0], np.float32)
    uniq, inv = _dense_unique(key)
    total = np.bincount(inv, weights=np.concatenate(vals)).astype(np.float32)
    count = np.bincount(inv).astype(np.float32)
    ea, eb = uniq // num, uniq % num
    out = np.empty(members.shape[0], np.float32)
    for s in range(0, members.shape[0], 512):
        m = members[s:s + 512]
        cross = (m[:, ea] != m[:, eb]).astype(np.float32)
        length = cross @ count
        out[s:s + 512] = np.where(length > 0, (cross @ total) / np.maximum(length, 1), 0.0)
    return out


def _prior_candidates(prior: np.ndarray, atom_map: np.ndarray, atom_area: np.ndarray,
                      grad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Prior thresholded at several levels, whole and per connected component, snapped to atoms.

    Args:
        prior: float32[h,w] at work resolution. atom_map: int64[h,w]. atom_area: float32[A].
        grad: float32[h,w] edge map (_edge_map).

    Returns:
        members bool[P,A], areas float32[P], boxes float32[P,4], edge float32[P] (mean edge
        strength on the mask's inner boundary).
    """
    lo, hi = float(prior.min()), float(prior.max())
    num = atom_area.size
    if hi - lo < 1e-6:
        return (np.zeros((0, num), bool), np.zeros(0, np.float32), np.zeros((0, 4), np.float32),
                np.zeros(0, np.float32))
    p = (prior - lo) / (hi - lo)
    flat = atom_map.ravel()
    masks: list[np.ndarray] = []
    for level in _PRIOR_LEVELS:
        binary = (p >= level).astype(np.uint8)
        masks.append(binary.astype(bool))
        n, comp = cv2.connectedComponents(binary, connectivity=8)
        if n > 2:
            masks.extend(comp == c for c in range(1, min(n, 33)))
    # Majority vote per atom aligns the blurry prior with image edges.
    members = np.stack([np.bincount(flat, weights=m.ravel(), minlength=num) * 2 > atom_area
                        for m in masks])
    snapped = np.take(members, atom_map, axis=1)
    areas = snapped.reshape(len(masks), -1).sum(1).astype(np.float32)
    boxes = np.zeros((len(masks), 4), np.float32)
    edge = np.zeros(len(masks), np.float32)
    kernel = np.ones((3, 3), np.uint8)
    for i, m in enumerate(snapped):
        if areas[i] == 0:
            continue
        m8 = m.astype(np.uint8)
        x, y, bw, bh = cv2.boundingRect(m8)
        boxes[i] = (x, y, x + bw - 1, y + bh - 1)
        rim = m & ~cv2.erode(m8, kernel, borderType=cv2.BORDER_REPLICATE).astype(bool)
        edge[i] = float(grad[rim].mean()) if rim.any() else 0.0
    return members, areas, boxes, edge


# --- public API ---------------------------------------------------------------------------------


def _hierarchical_method(image: np.ndarray, prior: np.ndarray | None, cfg: CosegConfig
                         ) -> ProposalSet:
    """Selective-search masks (see the module docstring); reads `cfg`'s CONFIG_FIELDS."""
    height, width = image.shape[:2]
    work = _work_image(image, cfg.work_max_side)
    h, w = work.shape[:2]
    if h * w < _MIN_WORK_PIXELS or height * width < _MIN_WORK_PIXELS:
        return _empty(height, width)
    prior_work = None
    if prior is not None:
        prior = np.asarray(prior, dtype=np.float32)
        if prior.shape != (height, width):
            raise ConfigError(f"prior must be float32[{height},{width}], got {prior.shape}")
        prior_work = cv2.resize(np.nan_to_num(prior), (w, h), interpolation=cv2.INTER_AREA)
        prior_work = np.clip(prior_work, 0.0, 1.0)
    atom_map, cand = _hierarchical(work)
    num_atoms = int(atom_map.max()) + 1
    atom_area = np.bincount(atom_map.ravel(), minlength=num_atoms).astype(np.float32)
    if prior_work is not None:
        pm, pa, pb, pe = _prior_candidates(prior_work, atom_map, atom_area, _edge_map(work))
        n = len(pa)
        cand = _Candidates(
            cand.parts + [(pm, np.arange(num_atoms))], np.concatenate([cand.areas, pa]),
            np.concatenate([cand.boxes_xyxy, pb]),
            # A prior mask gets the stability of a clearly persistent region (~90th percentile)
            np.concatenate([cand.stability, np.full(n, _PRIOR_STABILITY, np.float32)]),
            cand.sources + ["saliency"] * n,
            edge=np.concatenate([cand.edge, pe]) if cand.edge is not None else None,
            level=None, strategy=None)

    frac = cand.areas / float(h * w)
    keep = np.flatnonzero((frac >= cfg.min_area_frac) & (frac <= cfg.max_area_frac))
    if keep.size == 0:
        return _empty(height, width)
    keys = cand.keys()
    all_scores = _score(cand, float(h * w), cfg.seed)
    score = all_scores[keep]
    # Best first; exact duplicates (the same atoms from several strategies) keep the best copy.
    order = keep[np.lexsort((keep, -score))]
    _, first = np.unique(keys[order], return_index=True)
    order = order[np.sort(first)[:_NEAR_DUP_POOL * cfg.max_proposals]]
    rows = cand.member_rows(order)
    # Painted in full (ProposalSet.masks) they are bool[N,H,W]: bound that on huge images.
    max_keep = max(1, min(cfg.max_proposals, _MAX_MASK_BYTES // (height * width)))
    kept = _dedup(rows, cand.areas[order], cand.boxes_xyxy[order], atom_area, max_keep)
    idx = order[kept]
    members = rows[kept].toarray() > 0
    scores = all_scores[idx]
    sources = [cand.sources[i] for i in idx.tolist()]
    atom_map = atom_map.astype(np.int32)
    if (h, w) != (height, width):
        atom_map = cv2.resize(atom_map, (width, height), interpolation=cv2.INTER_NEAREST)
    return ProposalSet(atom_map, members, scores.astype(np.float32), sources)


def _area_weight(area_frac: np.ndarray) -> np.ndarray:
    """Prior weight of a candidate's size (piecewise linear in log10 area/image).

    Measured on 20 coco-dev images (10 categories): instances best covered by a candidate have
    area fractions spread over 1e-3…1e-1, while most candidates are tiny base regions (< 1e-3)
    or large merges (> 0.1), which rarely match an object.
    """
    log_frac = np.log10(np.maximum(area_frac, 1e-9))
    return np.interp(log_frac, _AREA_LOG10, _AREA_WEIGHT)


def _score(cand: _Candidates, num_pixels: float, seed: int) -> np.ndarray:
    """Weighted-sampling keys u^(1/w) in (0, 1] (Efraimidis–Spirakis) → float32[N].

    The weight w = size prior × (stability + 0.05) × (boundary edge strength + 0.2). Sorting by
    the key draws the top-k as a weighted random sample without replacement: deterministic
    objectness scores alone filled the top-k with near-identical small regions (recall@0.5 at
    1000: 0.23 by stability, 0.24 by edge strength, 0.41 uniform random, 0.49 with these keys;
    20 images, before near-duplicate removal). Weighting w by the
    prior's contrast (inside minus around) did not help there (0.47–0.50 → 0.34–0.47 with a
    U²-Net-p prior): coco-dev instances are often small, non-salient members of a group.
    Also tried on 37 images (1 per category), none better than these keys (0.395 at 1000 here):
    w × number of strategies producing the same atoms 0.408 offline / 0.382 in the benchmark;
    budget stratified by log-area bins (GT-like or flat quotas, random / objectness / edge /
    stability order within a bin) 0.26–0.36; NMS at IoU 0.6–0.9 on the top 3000–6000
    0.37–0.40. The union of all candidates reaches only 0.60 (0 hits for most instances
    < 0.1 % of the image), so recall is bounded by the pool as much as by the ranking.
    """
    rng = np.random.default_rng(seed)
    u = rng.random(cand.stability.shape[0])
    edge = cand.edge if cand.edge is not None else np.zeros_like(cand.stability)
    weight = (_area_weight(cand.areas / num_pixels) * (np.clip(cand.stability, 0.0, None) + 0.05)
              * (edge + 0.2))
    return np.power(u, 1.0 / np.maximum(weight, 1e-6)).astype(np.float32)


def _dedup(rows: sparse.csr_matrix, area: np.ndarray, boxes: np.ndarray, atom_area: np.ndarray,
           max_keep: int, iou_thresh: float = _DEDUP_IOU_THRESH) -> np.ndarray:
    """Greedy removal of near-duplicates (mask IoU > 0.95) from candidates sorted best first.

    Two masks with IoU > 0.95 have areas within 5% of each other and near-identical boxes, so only
    pairs in that area window whose boxes overlap at IoU ≥ 0.8 are compared exactly (on atoms).

    Args:
        rows: float32[N,A] canonical CSR atom membership (`_Candidates.member_rows`), best
            first. area: float[N] pixels. boxes: float[N,4] xyxy inclusive.
        atom_area: float32[A] pixels per atom.

    Returns:
        int64[≤ max_keep] indices of the kept candidates, in order.
    """
    n = area.shape[0]
    by_area = np.argsort(area, kind="stable")
    sorted_area = area[by_area]
    hi = np.searchsorted(sorted_area, sorted_area / iou_thresh, side="right")
    counts = hi - np.arange(n) - 1
    ii = np.repeat(np.arange(n), counts)
    offs = np.arange(ii.size) - np.repeat(np.cumsum(counts) - counts, counts)
    a, b = by_area[ii], by_area[ii + 1 + offs]
    ba, bb = boxes[a], boxes[b]
    iw = np.minimum(ba[:, 2], bb[:, 2]) - np.maximum(ba[:, 0], bb[:, 0]) + 1
    ih = np.minimum(ba[:, 3], bb[:, 3]) - np.maximum(ba[:, 1], bb[:, 1]) + 1
    inter_box = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (ba[:, 2] - ba[:, 0] + 1) * (ba[:, 3] - ba[:, 1] + 1)
    area_b = (bb[:, 2] - bb[:, 0] + 1) * (bb[:, 3] - bb[:, 1] + 1)
    close = inter_box >= (iou_thresh - 0.15) * (area_a + area_b - inter_box)
    a, b = a[close], b[close]
    suppressed = np.zeros(n, bool)
    if a.size:
        # Exact IoU on atoms via sparse rows: |A ∩ B| = Σ_atoms a·b·area
        weighted = rows @ sparse.diags(atom_area)
        inter = np.empty(a.size, np.float32)
        nnz = np.diff(rows.indptr)
        start = 0
        while start < a.size:  # chunks of ≤ ~4M stored atoms keep memory flat
            cum = np.cumsum(nnz[a[start:start + 65536]])
            stop = start + max(1, int(np.searchsorted(cum, 4_000_000)))
            sa, sb = a[start:stop], b[start:stop]
            inter[start:stop] = np.asarray(rows[sa].multiply(weighted[sb]).sum(1)).ravel()
            start = stop
        iou = inter / (area[a] + area[b] - inter)
        dup = iou > iou_thresh
        better, worse = np.minimum(a[dup], b[dup]), np.maximum(a[dup], b[dup])  # index = rank
        for p in np.argsort(better, kind="stable").tolist():
            if not suppressed[better[p]]:
                suppressed[worse[p]] = True
    return np.flatnonzero(~suppressed)[:max_keep]


def _empty(height: int, width: int) -> ProposalSet:
    return ProposalSet(np.zeros((height, width), np.int32), np.zeros((0, 1), bool),
                       np.zeros(0, np.float32), [])


# A source maps (image uint8[H,W,3], prior float32[H,W] or None, config) to its proposals.
ProposalMethod = Callable[[np.ndarray, np.ndarray | None, CosegConfig], ProposalSet]
METHODS: dict[str, ProposalMethod] = {"hierarchical": _hierarchical_method}


def get_method(name: str) -> ProposalMethod:
    """The proposal source registered as `name`; ConfigError lists the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown proposal method {name!r}; choose from {sorted(METHODS)}"
                          ) from None


def generate_proposals(image: np.ndarray, cfg: CosegConfig, *,
                       prior: np.ndarray | None = None) -> ProposalSet:
    """Candidate object masks of one image, best first.

    Args:
        image: uint8[H,W,3] RGB (uint8[H,W] grayscale is accepted).
        cfg: the run's config; only CONFIG_FIELDS are read:
            `proposal_method`, a key of METHODS;
            `max_proposals`, kept highest scores first (fewer on huge images: the returned masks
            are bounded to 1 GiB, e.g. ≤ 89 proposals for a 12-megapixel photo);
            `min_area_frac`, `max_area_frac`, the closed range of area/image kept;
            `work_max_side`, the longer side grouping runs at (masks are mapped back);
            `seed`, which seeds the uniform draws u of the weighted-sampling score keys u^(1/w)
            and so decides which candidates make the top k (same input and seed → same output).
        prior: optional float32[H,W] saliency map in [0,1]; adds thresholded-prior candidates
            (each level whole and per connected component, snapped to image atoms).

    Returns:
        ProposalSet (atoms at the image's resolution; `.masks` paints bool[N,H,W]), scores
        float32[N] descending, one source tag per proposal ("hier", "group", "saliency"); N may
        be 0.
    """
    fn = get_method(cfg.proposal_method)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or 0 in image.shape[:2]:
        raise ConfigError(f"image must be a non-empty uint8[H,W,3], got {image.dtype}{image.shape}")
    return fn(image, prior, cfg)


def proposals_to_coco(records: Sequence[Any], sets: Sequence[ProposalSet]) -> dict[str, Any]:
    """COCO dataset dict of proposals (category 1, "object"), readable by pycocotools.

    Args:
        records: per image, objects with `name`, `height`, `width` (e.g. ImageRecord).
        sets: the ProposalSet of each record, same order.

    Returns:
        {"images", "annotations", "categories"}; each annotation carries a compressed-RLE
        `segmentation`, `bbox` [x, y, w, h], `area` and `score`. Image ids are 1-based positions.
    """
    if len(records) != len(sets):
        raise ConfigError(f"{len(records)} records but {len(sets)} proposal sets")
    images, annotations = [], []
    ann_id = 1
    for img_id, (rec, props) in enumerate(zip(records, sets), start=1):
        images.append({"id": img_id, "file_name": rec.name, "height": int(rec.height),
                       "width": int(rec.width)})
        if props.atom_map.shape != (rec.height, rec.width) and len(props):
            raise ConfigError(f"{rec.name}: proposal masks {props.atom_map.shape} do not match "
                              f"the image size {(rec.height, rec.width)}")
        masks = props.masks
        rles = coco.encode_masks(masks)
        areas = masks.reshape(len(props), -1).sum(1) if len(props) else []
        for k, rle in enumerate(rles):
            annotations.append({
                "id": ann_id, "image_id": img_id, "category_id": 1, "segmentation": rle,
                "bbox": coco.bbox_xywh(masks[k]), "area": int(areas[k]), "iscrowd": 0,
                "score": float(props.scores[k]),
                "source": props.sources[k] if props.sources else "",
            })
            ann_id += 1
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}

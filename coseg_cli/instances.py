"""Stage 2: instance masks from the fine-tuned network, per image, then across the folder.

Two rankings of the mask proposals (`CosegConfig.ranking`):

- "peaks", the paper's: co-saliency peaks, PRM peak back-propagation, eq. 7 per peak, NMS.
- "common": every proposal is scored by how co-salient it is against its own surroundings
  (co-saliency contrast on a finer map); each image keeps its `common_pool` best; the folder-wide
  step multiplies by how well each one's fine-tuned feature is matched in the other images
  (commonness) and demotes those on the background side of the folder's DDT direction
  (`ranking.ddt_direction`), then NMS. It needs no peak back-propagation.

Per image, `image_stage2` computes what the instance cache holds (`Candidates`); the folder-wide
step, `select_folder`, turns those into ranked instances.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse

from . import losses, ranking
from . import model as model_mod
from . import peaks as peaks_mod
from .coco import mask_iou
from .config import CosegConfig
from .images import resize_map
from .records import ProposalSet

# Config fields that change a `Candidates` (its cache key holds these plus the proposals' and
# the fine-tuned model's keys). `select_folder`'s fields are applied after the cache.
CONFIG_FIELDS = ("ranking", "image_size", "infer_size", "cosal_stride", "max_peaks",
                 "rank_beta", "rank_gamma", "rank_cosal_power", "contour_px", "nms_iou_thresh",
                 "ring_px", "contrast_inside_power", "common_pool")
SELECT_FIELDS = ("ranking", "nms_iou_thresh", "max_instances", "common_seeds", "common_power",
                 "common_aggregate", "consensus_power", "noise_percentile", "ddt_negative_weight")

# Proposal statistics are taken on a grid this many times coarser than the working image: the
# co-saliency map is at most 1/16 of the image's resolution, so nothing finer is lost.
_STATS_SUBSAMPLE = 4


@dataclass
class Candidates:
    """Stage-2 result for one image at working resolution (what the instance cache holds).

    Attributes:
        cosal: float32[h,w] co-saliency in [0,1]. peaks_xy: int64[M,2] (x, y) working px, one
            per candidate: its peak ("peaks"), or its co-saliency maximum ("common").
        prop_idx: int64[M] proposal index of each candidate, by score descending.
        scores: float32[M] per-image score (eq. 7, or co-saliency contrast).
        embeddings: float32[M,C] unit-norm mean fine-tuned feature inside each mask.
        overlaps: float32[M,M] IoU between the candidates' masks (the folder step's NMS).
        descriptors: float32[M,C] mean raw fine-tuned feature inside each mask (DDT).
        feature_map: float16[L,C] the image's raw features, one row per grid cell: the folder
            step's DDT direction is fitted on every image's cells (half precision: 0.4 MB an
            image at 20×20×512, held for the whole folder).
    """

    cosal: np.ndarray
    peaks_xy: np.ndarray
    prop_idx: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray
    overlaps: np.ndarray
    descriptors: np.ndarray
    feature_map: np.ndarray


def mask_features(feats: torch.Tensor, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per mask, averages of the feature map over the grid cells it covers (area-weighted).

    Args:
        feats: float[1,C,gh,gw] feature map. masks: bool[M,h,w] at working resolution.

    Returns:
        embeddings float32[M,C], the unit-norm average of normalised features F̂ (for matching
        instances across images), and descriptors float32[M,C], the average of the raw
        features (for the folder's DDT direction, which is fitted on raw cells).
    """
    raw = feats[0].flatten(1).cpu().numpy().astype(np.float32)  # [C, gh*gw]
    fhat = losses.normalize_features(feats)[0].flatten(1).cpu().numpy()
    gh, gw = feats.shape[-2:]
    if len(masks) == 0:
        empty = np.zeros((0, fhat.shape[0]), np.float32)
        return empty, empty.copy()
    cover = np.stack([cv2.resize(m.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
                      for m in masks]).reshape(len(masks), -1)
    cover /= np.maximum(cover.sum(axis=1, keepdims=True), 1e-12)
    emb = cover @ fhat.T
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb.astype(np.float32), (cover @ raw.T).astype(np.float32)


def feature_cells(feats: torch.Tensor) -> np.ndarray:
    """float16[gh*gw,C]: the raw feature map, one row per grid cell (Candidates.feature_map)."""
    return feats[0].flatten(1).T.cpu().numpy().astype(np.float16)


def network_input(img: np.ndarray, cfg: CosegConfig, device: torch.device | str
                  ) -> torch.Tensor:
    """float32[1,3,S,S] stage-2 input, S = `infer_size` (or `image_size`), on `device`."""
    return model_mod.preprocess([img], cfg.infer_size or cfg.image_size).to(device)


def forward_maps(net: model_mod.CoSegNet, x: torch.Tensor, shape: tuple[int, int],
                 cosal_stride: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """One stage-2 forward pass.

    With `cosal_stride` 16 the saliency head (a 1×1 conv) also reads conv5_3, before the last
    pooling: the same weights on a map twice as fine, where small instances still own a cell.

    Args:
        x: from `network_input`. shape: (h, w) working resolution of the co-saliency map.

    Returns:
        feats float[1,C,S/32,S/32] (pool5, for embeddings), logits float[1,1,S/s,S/s] (s the
        stride) and the co-saliency float32[h,w] in [0,1] (logits upsampled, then sigmoid).
    """
    h, w = shape
    # channels-last input: oneDNN's NHWC kernels run this single-image 640 px forward pass
    # ~20 % faster on CPU than NCHW (1.66 → 1.31 s, 2 threads; the same weights, outputs equal
    # to ~1e-6 relative); fine-tuning runs channels-last too (train.TRAIN_MEMORY_FORMAT)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        if cosal_stride == 16:
            conv5 = net.features[:-1](x)
            feats = net.head(net.features[-1](conv5))
            logits = net.saliency(conv5)
        else:
            feats, logits = net(x)
        up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        cosal = torch.sigmoid(up)[0, 0].cpu().numpy().astype(np.float32)
    return feats, logits, cosal


@dataclass
class PeakScores:
    """Stage 2 up to the eq. 7 scores, before each peak picks its proposal.

    Attributes:
        feats: float[1,C,gh,gw] fine-tuned features. cosal: float32[h,w] co-saliency in [0,1].
        peak_rc: int64[K,2] (row, col) logit cells. peaks_xy: int64[K,2] (x, y) working px.
        scores: float32[K,N] R for every (peak, proposal); [K,0] or [0,N] when either is absent.
    """

    feats: torch.Tensor
    cosal: np.ndarray
    peak_rc: np.ndarray
    peaks_xy: np.ndarray
    scores: np.ndarray


def score_peaks(net: torch.nn.Module, img: np.ndarray, masks: np.ndarray, cfg: CosegConfig,
                device: torch.device | str, chunk: int) -> PeakScores:
    """Co-saliency, peaks, peak back-propagation and eq. 7 for one image (also what
    benchmarks/stage2_diagnosis.py inspects, so it measures exactly the pipeline's picks).

    Args:
        img: uint8[h,w,3] at working resolution. masks: bool[N,h,w] proposals.
    """
    h, w = img.shape[:2]
    x = network_input(img, cfg, device)
    feats, logits, cosal = forward_maps(net, x, (h, w), cfg.cosal_stride)  # type: ignore[arg-type]
    peak_rc = peaks_mod.find_peaks(logits[0, 0].cpu(), max_peaks=cfg.max_peaks or None)
    lh, lw = logits.shape[-2:]
    peaks_xy = np.stack([(peak_rc[:, 1] + 0.5) * w / lw, (peak_rc[:, 0] + 0.5) * h / lh],
                        axis=1).astype(np.int64) if len(peak_rc) else np.zeros((0, 2), np.int64)
    scores = np.zeros((len(peak_rc), len(masks)), np.float32)
    if len(peak_rc) and len(masks):
        logit_net = net if cfg.cosal_stride == 32 else torch.nn.Sequential(  # the same map
            net.features[:-1], net.saliency)  # type: ignore[index]
        inst_maps = peaks_mod.peak_backprop(logit_net, x, peak_rc, chunk=chunk).cpu().numpy()
        inst_maps = np.maximum(resize_map(inst_maps, (h, w)), 0.0)
        rank_cosal = cosal ** cfg.rank_cosal_power if cfg.rank_cosal_power != 1.0 else cosal
        scores = ranking.score_proposals_batch(inst_maps, rank_cosal, masks, beta=cfg.rank_beta,
                                               gamma=cfg.rank_gamma, contour_px=cfg.contour_px)
    return PeakScores(feats=feats, cosal=cosal, peak_rc=peak_rc, peaks_xy=peaks_xy,
                      scores=scores)


def _peak_candidates(net: torch.nn.Module, img: np.ndarray, masks: np.ndarray,
                     cfg: CosegConfig, device: torch.device | str, chunk: int) -> Candidates:
    """The paper's stage 2: `score_peaks`, then each peak's best proposal and NMS."""
    ps = score_peaks(net, img, masks, cfg, device, chunk)
    picks = ranking.select_instances(ps.scores, masks, nms_iou_thresh=cfg.nms_iou_thresh)
    prop_idx = np.array([p[1] for p in picks], np.int64)
    peak_idx = np.array([p[0] for p in picks], np.int64)
    picked = masks[prop_idx]
    embeddings, descriptors = mask_features(ps.feats, picked)
    return Candidates(cosal=ps.cosal, peaks_xy=ps.peaks_xy[peak_idx].reshape(-1, 2),
                      prop_idx=prop_idx, scores=np.array([p[2] for p in picks], np.float32),
                      embeddings=embeddings, overlaps=mask_iou(picked, picked).astype(np.float32),
                      descriptors=descriptors, feature_map=feature_cells(ps.feats))


def _area_operator(size: int, cells: int) -> np.ndarray:
    """float64[cells, size]: OpenCV's INTER_AREA shrinking of one axis as a matrix, read off by
    shrinking the identity (INTER_AREA is separable, so two of these give the 2-D resize)."""
    eye = np.eye(size, dtype=np.float32)
    return cv2.resize(eye, (cells, size), interpolation=cv2.INTER_AREA).T.astype(np.float64)


def atom_covers(atom_map: np.ndarray, gh: int, gw: int, num_atoms: int) -> sparse.csr_matrix:
    """float64[num_atoms, gh·gw]: each atom's INTER_AREA cover of a gh×gw grid (row-major), i.e.
    row a is cv2.resize(atom_map == a, (gw, gh), INTER_AREA) flattened, for every atom at once
    (an atom absent from the map, e.g. lost when the map was resized, covers nothing)."""
    h, w = atom_map.shape
    rx, ry = _area_operator(w, gw), _area_operator(h, gh)
    # along x: row (atom, y) of the image's indicator, shrunk to gw cells
    rows = (atom_map.astype(np.int64) * h + np.arange(h)[:, None]).ravel()
    cols = np.tile(np.arange(w), h)
    along_x = (sparse.csr_matrix((np.ones(h * w), (rows, cols)), shape=(num_atoms * h, w))
               @ sparse.csr_matrix(rx.T)).tocoo()  # [(atom, y), x cell]
    atom, y = np.divmod(along_x.row, h)
    # along y: regroup as row (atom, x cell), column y, shrunk to gh cells
    both = (sparse.csr_matrix((along_x.data, (atom * gw + along_x.col, y)),
                              shape=(num_atoms * gw, h)) @ sparse.csr_matrix(ry.T)).tocoo()
    atom, cx = np.divmod(both.row, gw)
    return sparse.csr_matrix((both.data, (atom, both.col * gw + cx)), shape=(num_atoms, gh * gw))


def contrast_stats(props: ProposalSet, cosal: np.ndarray, ring_px: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Mean co-saliency inside each proposal and in the ring just outside it.

    Both are taken on a grid `_STATS_SUBSAMPLE`× coarser than the masks (area-weighted cover),
    the ring being the mask's cover dilated by `ring_px` working pixels, minus the cover. The
    cover is linear in the mask, so it is summed from the atoms' covers (`atom_covers`) without
    painting the proposals.

    Args:
        props: N proposals at the map's resolution. cosal: float32[h,w] in [0,1]. ring_px: ring
            width, working px.

    Returns:
        (inside, ring): float32[N] each, in [0,1] (ring 0 where the mask fills the image).
    """
    n = len(props)
    h, w = props.atom_map.shape
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    gw, gh = max(1, w // _STATS_SUBSAMPLE), max(1, h // _STATS_SUBSAMPLE)
    side = 2 * max(1, round(ring_px / _STATS_SUBSAMPLE)) + 1
    kernel = np.ones((side, side), np.uint8)
    covers = atom_covers(props.atom_map, gh, gw, props.members.shape[1])
    cover = (sparse.csr_matrix(props.members, dtype=np.float64) @ covers).toarray()
    cover = cover.astype(np.float32)
    ring = np.stack([cv2.dilate(c.reshape(gh, gw), kernel) for c in cover]).reshape(n, -1)
    ring -= cover  # ≥ 0 exactly: the dilation's window holds its centre
    s = cv2.resize(cosal.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA).ravel()
    inside = cover @ s / np.maximum(cover.sum(axis=1), 1e-12)
    around = ring @ s / np.maximum(ring.sum(axis=1), 1e-12)
    return inside.astype(np.float32), around.astype(np.float32)


def atom_iou(props: ProposalSet, idx: np.ndarray) -> np.ndarray:
    """float64[M,M] exact IoU among the proposals `idx`, from their atoms' pixel counts (the
    painted masks' IoU, as `coco.mask_iou` gives it; 0 where both are empty)."""
    areas = np.bincount(props.atom_map.ravel(), minlength=props.members.shape[1])
    rows = sparse.csr_matrix(props.members[np.asarray(idx, np.int64)], dtype=np.float64)
    inter = (rows @ sparse.diags(areas.astype(np.float64)) @ rows.T).toarray()
    area = np.diag(inter).copy()
    union = area[:, None] + area[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def contrast_scores(inside: np.ndarray, ring: np.ndarray, inside_power: float) -> np.ndarray:
    """Co-saliency contrast: (S inside − S around)₊ · (S inside)^`inside_power`.

    High only for a mask that holds a co-salient blob *and* stops where the blob stops: a mask
    around two instances, or a part of one, is co-salient on its border too.
    """
    return (np.clip(inside - ring, 0.0, None) * inside ** inside_power).astype(np.float32)


def _cosal_maxima(masks: np.ndarray, cosal: np.ndarray) -> np.ndarray:
    """int64[M,2] (x, y) of each mask's co-saliency maximum ((0, 0) for an empty mask)."""
    out = np.zeros((len(masks), 2), np.int64)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if ys.size:
            k = int(np.argmax(cosal[ys, xs]))
            out[i] = (xs[k], ys[k])
    return out


def _common_candidates(net: torch.nn.Module, img: np.ndarray, props: ProposalSet,
                       cfg: CosegConfig, device: torch.device | str) -> Candidates:
    """Every proposal scored by co-saliency contrast; the best `common_pool` are kept, without
    NMS: the folder step re-ranks them with commonness first (`select_folder`)."""
    feats, _, cosal = forward_maps(net, network_input(img, cfg, device),  # type: ignore[arg-type]
                                   img.shape[:2], cfg.cosal_stride)
    inside, ring = contrast_stats(props, cosal, cfg.ring_px)
    scores = contrast_scores(inside, ring, cfg.contrast_inside_power)
    keep = np.argsort(-scores, kind="stable")[:cfg.common_pool].astype(np.int64)
    kept = props.paint(keep)  # only the pool's masks are painted
    embeddings, descriptors = mask_features(feats, kept)
    return Candidates(cosal=cosal, peaks_xy=_cosal_maxima(kept, cosal), prop_idx=keep,
                      scores=scores[keep], embeddings=embeddings,
                      overlaps=atom_iou(props, keep).astype(np.float32), descriptors=descriptors,
                      feature_map=feature_cells(feats))


def image_stage2(net: torch.nn.Module, img: np.ndarray, props: ProposalSet, cfg: CosegConfig,
                 device: torch.device | str, chunk: int = peaks_mod.BACKPROP_CHUNK
                 ) -> Candidates:
    """Stage 2 for one image, by `cfg.ranking`.

    Args:
        img: uint8[h,w,3] at working resolution. props: its proposals, at the same resolution.
        chunk: peaks per back-propagation pass ("peaks" only).
    """
    if cfg.ranking == "peaks":
        return _peak_candidates(net, img, props.masks, cfg, device, chunk)
    return _common_candidates(net, img, props, cfg, device)


def select_folder(per_image: list[Candidates], cfg: CosegConfig) -> list[tuple[np.ndarray,
                                                                              np.ndarray]]:
    """The folder-wide step: which candidates of each image are instances, and their scores.

    "peaks": the authors' noise filter, then (if `consensus_power`) × consensus^p.
    "common": (score / the image's best score) × commonness^`common_power`, commonness
    measured against the best `common_seeds` candidates (after NMS) of every other image and
    aggregated by `common_aggregate` (`ranking.commonness`), × `ddt_negative_weight` where the
    candidate's mean descriptor lies on the background side of the folder's DDT direction
    (`ranking.ddt_direction`, oriented by the same seeds); then NMS keeps at most
    `max_instances`.

    Returns:
        per image, (indices into its candidates by final score descending, float64 scores).
    """
    if cfg.ranking == "common":
        return _select_common(per_image, cfg)
    keep = ranking.noise_filter([c.scores for c in per_image], percentile=cfg.noise_percentile)
    final = [c.scores.astype(np.float64) for c in per_image]
    if cfg.consensus_power > 0:  # the kept instances of the other images vote
        agree = ranking.consensus_scores([c.embeddings[k] for c, k in zip(per_image, keep)])
        for s, k, a in zip(final, keep, agree):
            s[k] *= a ** cfg.consensus_power
    out = []
    for s, k in zip(final, keep):
        order = np.array([j for j in np.argsort(-s, kind="stable") if k[j]], np.int64)
        out.append((order, s[order]))
    return out


def _select_common(per_image: list[Candidates], cfg: CosegConfig
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`select_folder` for "common" (see there)."""
    def nms(scores: np.ndarray, c: Candidates, keep: int) -> np.ndarray:
        return ranking.nms_by_iou(scores, c.overlaps, iou_thresh=cfg.nms_iou_thresh,
                                  max_keep=keep)

    seed_idx = [nms(c.scores, c, cfg.common_seeds) for c in per_image]
    common = ranking.commonness([c.embeddings for c in per_image],
                                [c.embeddings[i] for c, i in zip(per_image, seed_idx)],
                                cfg.common_aggregate)
    ddt = None
    if cfg.ddt_negative_weight != 1.0:  # oriented by the same seeds
        anchors = [c.descriptors[i] for c, i in zip(per_image, seed_idx)]
        ddt = ranking.ddt_direction([c.feature_map for c in per_image],
                                    np.concatenate(anchors) if anchors else np.zeros((0, 0)))
    out = []
    for c, a in zip(per_image, common):
        # every photo of the folder shows the category (the premise of co-segmentation), so
        # each image's best contrast counts as 1: scores compare across images
        final = (c.scores.astype(np.float64) / max(float(c.scores.max(initial=0.0)), 1e-12)
                 * a ** cfg.common_power)
        if ddt is not None:  # DDT's own threshold: the indicator's sign
            final *= np.where(ranking.ddt_indicator(c.descriptors, *ddt) > 0, 1.0,
                              cfg.ddt_negative_weight)
        order = nms(final, c, cfg.max_instances)
        out.append((order, final[order]))
    return out

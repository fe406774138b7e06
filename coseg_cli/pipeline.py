"""Orchestration only: priors → fine-tuning → co-saliency peaks → peak back-propagation →
proposal ranking → NMS → folder-wide noise filter. Each stage's result is cached by content hash
plus the config fields that change it, so a re-run resumes where the last one stopped."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import losses, ranking, saliency, train, weights
from . import model as model_mod
from . import peaks as peaks_mod
from . import proposals as proposals_mod
from .config import CosegConfig, preset_config
from .errors import InputError
from .images import load_folder, resize_map, shrink_to
from .records import ImageRecord, Instance, RunResult
from .runtime import (
    StageCache,
    config_key,
    environment_record,
    resolve_device,
    seed_everything,
    set_threads,
    sha1_bytes,
)

Progress = Callable[[str, int, int], None]

# Bump when a stage's algorithm changes, so old cache entries are not reused.
CACHE_VERSION = {"prior": 1, "proposals": 2, "instances": 2}


def upscale_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool[h,w] → bool[H,W] with smooth edges (bilinear, then ≥ 0.5)."""
    if mask.shape == shape:
        return mask
    return resize_map(mask.astype(np.float32), shape, cv2.INTER_LINEAR) >= 0.5


def _notify(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def compute_priors(works: list[np.ndarray], sha1s: list[str], cfg: CosegConfig,
                   cache: StageCache, progress: Progress | None = None) -> list[np.ndarray]:
    """Saliency prior per image, float32[h,w] in [0,1] at working resolution."""
    priors = []
    for i, (img, sha) in enumerate(zip(works, sha1s)):
        key = config_key(sha, cfg.prior, cfg.work_max_side, CACHE_VERSION["prior"])
        hit = cache.load("prior", key)
        if hit is None:
            prior = saliency.compute_saliency(img, cfg.prior, work_max_side=cfg.work_max_side)
            cache.save("prior", key, prior=prior.astype(np.float32))
        else:
            prior = hit["prior"].astype(np.float32)
        priors.append(prior.astype(np.float32))
        _notify(progress, "prior", i + 1, len(works))
    return priors


def compute_proposals(img: np.ndarray, prior: np.ndarray, sha: str, cfg: CosegConfig,
                      cache: StageCache) -> np.ndarray:
    """bool[N,h,w] candidate masks at working resolution (cached bit-packed)."""
    key = config_key(sha, cfg.proposal_method, cfg.max_proposals, cfg.min_area_frac,
                     cfg.max_area_frac, cfg.work_max_side, cfg.prior, cfg.seed,
                     CACHE_VERSION["proposals"])
    hit = cache.load("proposals", key)
    h, w = img.shape[:2]
    if hit is not None:
        n = int(hit["count"])
        return np.unpackbits(hit["packed"], axis=-1, count=h * w).astype(bool).reshape(n, h, w)
    props = proposals_mod.generate_proposals(
        img, method=cfg.proposal_method, max_proposals=cfg.max_proposals,
        min_area_frac=cfg.min_area_frac, max_area_frac=cfg.max_area_frac,
        work_max_side=cfg.work_max_side, prior=prior, seed=cfg.seed)
    masks = props.masks
    cache.save("proposals", key, count=np.array(len(masks)),
               packed=np.packbits(masks.reshape(len(masks), h * w), axis=-1))  # N may be 0
    return masks


@dataclass
class Candidates:
    """Stage-2 result for one image at working resolution (what the instance cache holds).

    Attributes:
        cosal: float32[h,w] co-saliency in [0,1]. peaks_xy: int64[K,2] (x, y) working px.
        prop_idx: int64[M] chosen proposal per kept candidate (after NMS), by score descending.
        scores: float32[M] ranking score R. peak_idx: int64[M] the peak each one came from.
        embeddings: float32[M,C] unit-norm mean fine-tuned feature inside each mask.
    """

    cosal: np.ndarray
    peaks_xy: np.ndarray
    prop_idx: np.ndarray
    scores: np.ndarray
    peak_idx: np.ndarray
    embeddings: np.ndarray


def mask_embeddings(feats: torch.Tensor, masks: np.ndarray) -> np.ndarray:
    """float32[M,C]: per mask, the unit-norm average of normalised features F̂ over the grid
    cells it covers (area-weighted), for matching instances across images.

    Args:
        feats: float[1,C,gh,gw] feature map. masks: bool[M,h,w] at working resolution.
    """
    fhat = losses.normalize_features(feats)[0].flatten(1).cpu().numpy()  # [C, gh*gw]
    gh, gw = feats.shape[-2:]
    if len(masks) == 0:
        return np.zeros((0, fhat.shape[0]), np.float32)
    cover = np.stack([cv2.resize(m.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
                      for m in masks]).reshape(len(masks), -1)
    cover /= np.maximum(cover.sum(axis=1, keepdims=True), 1e-12)
    emb = cover @ fhat.T
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb.astype(np.float32)


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
    x = model_mod.preprocess([img], cfg.infer_size or cfg.image_size).to(device)
    with torch.no_grad():
        feats, logits = net(x)
    cosal = torch.sigmoid(F.interpolate(logits, size=(h, w), mode="bilinear",
                                        align_corners=False))[0, 0].cpu().numpy()
    peak_rc = peaks_mod.find_peaks(logits[0, 0].cpu(), max_peaks=cfg.max_peaks or None)
    lh, lw = logits.shape[-2:]
    peaks_xy = np.stack([(peak_rc[:, 1] + 0.5) * w / lw, (peak_rc[:, 0] + 0.5) * h / lh],
                        axis=1).astype(np.int64) if len(peak_rc) else np.zeros((0, 2), np.int64)
    scores = np.zeros((len(peak_rc), len(masks)), np.float32)
    if len(peak_rc) and len(masks):
        inst_maps = peaks_mod.peak_backprop(net, x, peak_rc, chunk=chunk).cpu().numpy()
        inst_maps = np.maximum(resize_map(inst_maps, (h, w)), 0.0)
        rank_cosal = cosal ** cfg.rank_cosal_power if cfg.rank_cosal_power != 1.0 else cosal
        scores = ranking.score_proposals_batch(inst_maps, rank_cosal, masks, beta=cfg.rank_beta,
                                               gamma=cfg.rank_gamma, contour_px=cfg.contour_px)
    return PeakScores(feats=feats, cosal=cosal.astype(np.float32), peak_rc=peak_rc,
                      peaks_xy=peaks_xy, scores=scores)


def image_candidates(net: torch.nn.Module, img: np.ndarray, masks: np.ndarray,
                     cfg: CosegConfig, device: torch.device, chunk: int) -> Candidates:
    """Stage 2 for one image: `score_peaks`, then each peak's best proposal and NMS.

    Args:
        img: uint8[h,w,3] at working resolution. masks: bool[N,h,w] proposals.
    """
    ps = score_peaks(net, img, masks, cfg, device, chunk)
    picks = ranking.select_instances(ps.scores, masks, nms_iou_thresh=cfg.nms_iou_thresh)
    prop_idx = np.array([p[1] for p in picks], np.int64)
    return Candidates(cosal=ps.cosal, peaks_xy=ps.peaks_xy, prop_idx=prop_idx,
                      scores=np.array([p[2] for p in picks], np.float32),
                      peak_idx=np.array([p[0] for p in picks], np.int64),
                      embeddings=mask_embeddings(ps.feats, masks[prop_idx]))


def as_records(images: Sequence[ImageRecord] | Sequence[np.ndarray] | Path | str
               ) -> list[ImageRecord]:
    """Accept a folder, loaded records, or RGB uint8 arrays (named image_000.png, …)."""
    if isinstance(images, (str, Path)):
        return load_folder(Path(images))[0]
    records = []
    for i, item in enumerate(images):
        if isinstance(item, ImageRecord):
            records.append(item)
            continue
        arr = np.asarray(item)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise InputError(f"image {i}: expected uint8[H,W,3] RGB, got {arr.dtype}{arr.shape}")
        records.append(ImageRecord(path=Path(f"image_{i:03d}.png"), name=f"image_{i:03d}.png",
                                   image=arr, sha1=sha1_bytes(arr.tobytes() + str(arr.shape)
                                                              .encode())))
    return records


def cosegment(images: Sequence[ImageRecord] | Sequence[np.ndarray] | Path | str,
              cfg: CosegConfig | None = None, *, cache_dir: Path | None = None,
              weights_path: Path | None = None, category: str = "object",
              progress: Progress | None = None, backprop_chunk: int = 4) -> RunResult:
    """Co-segment a group of images of one category; writes nothing (cache aside).

    Args:
        images: a folder, loaded ImageRecords (images.load_folder) or uint8[H,W,3] RGB arrays;
            at least 2. cfg: the run's frozen config (default: the default preset).
        cache_dir: stage cache root (None: no caching). weights_path: explicit VGG-16 weights.

    Returns:
        RunResult with instances (masks at each image's resolution), co-saliency maps, timings.
    """
    cfg = cfg if cfg is not None else preset_config()
    records = as_records(images)
    if len(records) < 2:
        raise InputError(f"co-segmentation needs at least 2 images, got {len(records)}")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    set_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    cache = StageCache(cache_dir)
    works = [shrink_to(r.image, cfg.work_max_side) for r in records]
    sha1s = [r.sha1 for r in records]

    t = time.perf_counter()
    priors = compute_priors(works, sha1s, cfg, cache, progress)
    timings["prior"] = time.perf_counter() - t

    t = time.perf_counter()
    state, winfo = weights.load_vgg16_features(weights_path)
    net = model_mod.build_model(cfg, state).to(device)
    model_cache = None if cache_dir is None else Path(cache_dir) / "model"
    report = train.load_or_finetune(net, works, priors, sha1s, cfg, device=device,
                                    cache_dir=model_cache,
                                    progress=None if progress is None else
                                    (lambda stage, done, total, *_: progress(stage, done, total)))
    net.eval()
    timings["train"] = time.perf_counter() - t

    model_key = train.state_digest(net)  # the fine-tuned weights themselves key stage 2
    t_prop = t_inst = 0.0
    per_image: list[Candidates] = []
    all_masks: list[np.ndarray] = []
    for i, (img, prior, sha) in enumerate(zip(works, priors, sha1s)):
        t = time.perf_counter()
        masks = compute_proposals(img, prior, sha, cfg, cache)
        t_prop += time.perf_counter() - t
        t = time.perf_counter()
        key = config_key(model_key, sha, cfg.max_peaks, cfg.rank_beta, cfg.rank_gamma,
                         # left out at its default, so entries cached before it existed stay valid
                         *([cfg.rank_cosal_power] if cfg.rank_cosal_power != 1.0 else []),
                         *([cfg.infer_size] if cfg.infer_size else []),
                         cfg.contour_px, cfg.nms_iou_thresh, len(masks), CACHE_VERSION["instances"],
                         cfg.proposal_method, cfg.max_proposals)
        hit = cache.load("instances", key)
        if hit is None:
            cand = image_candidates(net, img, masks, cfg, device, backprop_chunk)
            cache.save("instances", key, **asdict(cand))
        else:
            cand = Candidates(**hit)
        per_image.append(cand)
        all_masks.append(masks[cand.prop_idx])
        t_inst += time.perf_counter() - t
        _notify(progress, "instances", i + 1, len(works))
    timings["proposals"] = t_prop
    timings["instances"] = t_inst

    t = time.perf_counter()
    keep = ranking.noise_filter([c.scores for c in per_image], percentile=cfg.noise_percentile)
    final_scores = [c.scores.astype(np.float64) for c in per_image]
    if cfg.consensus_power > 0:  # the kept instances of the other images vote
        agree = ranking.consensus_scores([c.embeddings[k] for c, k in zip(per_image, keep)])
        for s, k, a in zip(final_scores, keep, agree):
            s[k] *= a ** cfg.consensus_power
    instances: list[Instance] = []
    cosal_full: list[np.ndarray] = []
    for i, (rec, cand, masks, kept, scores) in enumerate(zip(records, per_image, all_masks, keep,
                                                             final_scores)):
        shape = rec.image.shape[:2]
        sy, sx = shape[0] / cand.cosal.shape[0], shape[1] / cand.cosal.shape[1]
        order = [j for j in np.argsort(-scores, kind="stable") if kept[j]]
        for rank, j in enumerate(order, start=1):
            px, py = cand.peaks_xy[cand.peak_idx[j]]
            instances.append(Instance(
                image_index=i, mask=upscale_mask(masks[j], shape), score=float(scores[j]),
                peak_xy=(min(int(px * sx), shape[1] - 1), min(int(py * sy), shape[0] - 1)),
                rank=rank, embedding=cand.embeddings[j]))
        full = resize_map(cand.cosal, shape, cv2.INTER_LINEAR)  # clipped in place: 4 B/px
        cosal_full.append(np.clip(full, 0.0, 1.0, out=None if full is cand.cosal else full))
    timings["select"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    return RunResult(
        images=records, instances=instances, cosaliency=cosal_full, config=asdict(cfg),
        environment=environment_record(device), timings=timings, category=category,
        info={"weights": asdict(winfo), "prior": cfg.prior,
              "prior_trained": saliency.get_method(cfg.prior).trained,
              "cache_hits": dict(cache.hits), "train": asdict(report)},
        peaks=[c.peaks_xy for c in per_image])


def build_manifest(result: RunResult, folder: Path, started_at: float,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to audit or replay a run (`coseg run --config manifest.json`)."""
    per_image = [0] * len(result.images)
    for inst in result.instances:
        per_image[inst.image_index] += 1
    return {
        "config": result.config,
        "category": result.category,
        "input_folder": str(folder),
        "inputs": [{"name": r.name, "sha1": r.sha1, "bytes": r.path.stat().st_size
                    if r.path.exists() else None, "height": r.height, "width": r.width}
                   for r in result.images],
        "environment": result.environment,
        "seed": result.config["seed"],
        **result.info,
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "counts": {"images": len(result.images), "instances": len(result.instances),
                   "instances_per_image": per_image,
                   # for the report's outlier check (the PNGs hold only 8-bit JET colours)
                   "cosaliency_mean": [round(float(np.mean(c)), 6) for c in result.cosaliency]},
        "started_at": datetime.fromtimestamp(started_at, UTC).isoformat(),
        **(extra or {}),
    }

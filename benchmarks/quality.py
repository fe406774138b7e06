"""Quality benchmark: run coseg over coco-dev categories and score with `coseg eval`.

Prints per category mAP^r@.25/.5/.75, CorLoc^r, recall at IoU > .5 by COCO size (small < 32²,
medium < 96², large, in image pixels) and seconds per folder, for the method and for the
prior-components baseline (the run's own saliency prior, min-max normalised, thresholded at 0.5,
each connected component one instance scored by its mean prior: no network at all); then the
means over categories and one JSON line.

Stage caches are shared across runs (--cache): a variant that changes only stage 2 re-uses the
cached priors, proposals and fine-tuned weights. `--stage2-only` insists on that: a category
whose fine-tuned weights are not cached for these settings is skipped, not trained.

    python benchmarks/quality.py                          # all 36 categories with <= 40 images
    python benchmarks/quality.py --set prior=fusion --cache /tmp/coseg-quality/cache-fusion
    python benchmarks/quality.py --stage2-only --set common_power=1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coseg_cli import export, images, pipeline, train, weights
from coseg_cli import model as model_mod
from coseg_cli.coco import rle_iou
from coseg_cli.config import CosegConfig, preset_config
from coseg_cli.evaluate import (
    GTCategory,
    ImagePredictions,
    evaluate_category,
    load_gt_json,
    load_predictions,
)
from coseg_cli.runtime import StageCache

DATA = REPO.parent / "shared" / "data" / "coco-dev"
SIZES = (("small", 0, 32 ** 2), ("medium", 32 ** 2, 96 ** 2), ("large", 96 ** 2, np.inf))
METRICS = ("AP25", "AP50", "AP75", "CorLoc")


def _parse_value(field: str, raw: str):
    typ = type(getattr(CosegConfig(), field))
    return typ(float(raw)) if typ is int else typ(raw)


def size_hits(gt: GTCategory, preds: ImagePredictions, iou_thresh: float = 0.5
              ) -> dict[str, list[int]]:
    """Per COCO size bucket: [GT instances, GT instances some prediction covers at IoU > t]."""
    out = {name: [0, 0] for name, _, _ in SIZES}
    for im, rles in zip(gt.images, preds.rles):
        if not im.rles:
            continue
        best = rle_iou(rles, im.rles).max(axis=0) if rles else np.zeros(len(im.rles))
        for area, iou in zip(mask_utils.area(im.rles), best):
            name = next(n for n, lo, hi in SIZES if lo <= area < hi)
            out[name][0] += 1
            out[name][1] += int(iou > iou_thresh)
    return out


def prior_components(prior: np.ndarray, shape: tuple[int, int]) -> tuple[list, list[float]]:
    """The baseline's instances of one image: RLEs at `shape` and their mean-prior scores."""
    lo, hi = float(prior.min()), float(prior.max())
    p = (prior - lo) / max(hi - lo, 1e-12)
    n, comp = cv2.connectedComponents((p >= 0.5).astype(np.uint8), connectivity=8)
    rles, scores = [], []
    for c in range(1, n):
        m = comp == c
        scores.append(float(p[m].mean()))
        full = pipeline.upscale_mask(m, shape)
        rles.append(mask_utils.encode(np.asfortranarray(full.astype(np.uint8))))
    return rles, scores


def baseline_predictions(records, priors, gt: GTCategory) -> ImagePredictions:
    rles: list[list] = [[] for _ in gt.images]
    scores: list[list[float]] = [[] for _ in gt.images]
    for rec, prior in zip(records, priors):
        g = gt.lookup(rec.name, None)
        if g is not None:
            rles[g], scores[g] = prior_components(prior, rec.image.shape[:2])
    return ImagePredictions(rles, scores)


def weights_cached(records, works, priors, cfg: CosegConfig, cache: Path) -> bool:
    """Whether the fine-tuning cache already holds this folder's weights for `cfg`."""
    state, _ = weights.load_vgg16_features(None)
    net = model_mod.build_model(cfg, state)
    key = train.train_cache_key([r.sha1 for r in records], cfg, train.state_digest(net),
                                train.priors_digest(priors))
    return (cache / "model" / f"{key}.pt").is_file()


def _row(name: str, r: dict, seconds: float | None = None) -> str:
    cells = "".join(f"{r[k]:7.1f}" for k in METRICS)
    sizes = "".join(f"{r[f'R50_{n}']:7.1f}" for n, _, _ in SIZES)
    return f"{name:<14}{cells}{sizes}" + (f"{seconds:8.1f}" if seconds is not None else "")


def _with_sizes(res: dict, hits: dict[str, list[int]]) -> dict:
    return {**res, **{f"R50_{n}": 100.0 * h / max(t, 1) for n, (t, h) in hits.items()},
            "size_hits": hits}


def _mean(rows: dict[str, dict]) -> dict[str, float]:
    m = {k: round(float(np.mean([r[k] for r in rows.values()])), 2) for k in METRICS}
    for n, _, _ in SIZES:  # pooled over categories: buckets are small per category
        total = sum(r["size_hits"][n][0] for r in rows.values())
        hit = sum(r["size_hits"][n][1] for r in rows.values())
        m[f"R50_{n}"] = round(100.0 * hit / max(total, 1), 2)
    return m


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--categories", default="", help="comma list (default: all with <= 40 images)")
    ap.add_argument("--max-images", type=int, default=40)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="config override, repeatable")
    ap.add_argument("--out", type=Path, default=Path("/tmp/coseg-quality/out"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/coseg-quality/cache"))
    ap.add_argument("--stage2-only", action="store_true",
                    help="skip categories whose fine-tuned weights are not cached")
    return ap.parse_args()


def run_category(cat: str, cfg: CosegConfig, args: argparse.Namespace
                 ) -> tuple[dict, dict, float] | None:
    """Scores of the method and of the baseline on one category and the seconds it took, or
    None when --stage2-only and its fine-tuned weights are not cached."""
    t = time.time()
    records, _ = images.load_folder(args.data / cat / "images")
    gt = load_gt_json(args.data / cat / "annotations.json", name=cat)
    cache = StageCache(args.cache / cat)
    works = [images.shrink_to(r.image, cfg.work_max_side) for r in records]
    priors = pipeline.compute_priors(works, [r.sha1 for r in records], cfg, cache)
    if args.stage2_only and not weights_cached(records, works, priors, cfg, args.cache / cat):
        print(f"  skipped {cat}: no cached fine-tuned weights for these settings", flush=True)
        return None
    preds = baseline_predictions(records, priors, gt)
    base = _with_sizes(evaluate_category(gt, preds), size_hits(gt, preds))
    result = pipeline.cosegment(records, cfg, cache_dir=args.cache / cat, category=cat)
    export.write_all(result, args.out / cat)
    preds = load_predictions(args.out / cat, gt)  # what `coseg eval` reads
    method = _with_sizes(evaluate_category(gt, preds), size_hits(gt, preds))
    seconds = time.time() - t
    stages = " ".join(f"{k}={v:.0f}" for k, v in result.timings.items() if k != "total")
    print(f"  ran {cat}: {len(records)} images, {len(result.instances)} instances, "
          f"{seconds:.1f} s ({stages}; cache hits {result.cache_hits})\n"
          f"  {_row(cat, method)}   | baseline {_row('', base)[14:]}", flush=True)
    return method, base, seconds


def main() -> None:
    args = _parse_args()
    overrides = {}
    for item in args.set:
        field, _, raw = item.partition("=")
        overrides[field] = _parse_value(field, raw)
    cfg = preset_config(args.preset, **overrides)
    if args.categories:
        cats = args.categories.split(",")
    else:
        cats = sorted(p.name for p in args.data.iterdir()
                      if p.is_dir() and len(images.list_images(p / "images")) <= args.max_images)
    print(f"config: preset={args.preset} {overrides} prior={cfg.prior}", flush=True)
    method: dict[str, dict] = {}
    base: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for cat in cats:
        ran = run_category(cat, cfg, args)
        if ran is not None:
            method[cat], base[cat], seconds[cat] = ran
    done = list(method)
    if not done:
        raise SystemExit("no category was run")
    head = "".join(f"{k:>7}" for k in METRICS) + "".join(f"{'R50' + n[0]:>7}" for n, _, _ in SIZES)
    print(f"{'category':<14}{head}{'s':>8}   | prior-components baseline")
    for c in done:
        print(_row(c, method[c], seconds[c]) + "   | " + _row("", base[c])[14:])
    m, b = _mean(method), _mean(base)
    print(_row("mean", m, sum(seconds.values())) + "   | " + _row("", b)[14:])
    print(json.dumps({**m, "baseline": b, "seconds": round(sum(seconds.values()), 1),
                      "categories": done, "preset": args.preset, "overrides": overrides,
                      "prior": cfg.prior,
                      "per_category": {c: {k: round(method[c][k], 2) for k in METRICS}
                                       for c in done}}))


if __name__ == "__main__":
    main()

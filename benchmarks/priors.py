"""Measure every saliency prior on coco-dev: MAE, max F-β (β² = 0.3) and ROC AUC against the union
of the category's instances (crowd pixels, 255, ignored), averaged over images; seconds per image.

    python benchmarks/priors.py [--data ../shared/data/coco-dev] [--categories apple,cup]
        [--limit-per-category N] [--methods rbd,u2netp] [--work-max-side 640]

Prints a table and, last, one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from coseg_cli.config import CosegConfig
from coseg_cli.images import list_images, load_image
from coseg_cli.saliency import METHODS, compute_saliency

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-dev"
BETA2 = 0.3  # the saliency literature's β² for F-measure (precision weighted more)
MAX_IMAGES_DEFAULT = 40  # default set: categories with ≤ 40 images (leaves out `person`, 132)


def score_map(sal: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """MAE, max F-β over thresholds 0..255 and ROC AUC of one map.

    Args:
        sal: float32[H,W] in [0,1]. gt: bool[H,W] foreground. valid: bool[H,W] pixels to score.
    """
    s = sal[valid]
    g = gt[valid]
    mae = float(np.abs(s - g).mean()) if s.size else float("nan")
    q = np.clip(np.round(s * 255), 0, 255).astype(np.int64)
    pos = np.bincount(q[g], minlength=256).astype(np.float64)
    neg = np.bincount(q[~g], minlength=256).astype(np.float64)
    # counts with value >= t, for t = 0..255 (and t = 256: nothing predicted)
    tp = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])
    fp = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]])
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return {"mae": mae, "max_fbeta": float("nan"), "auc": float("nan")}
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    recall = tp / n_pos
    denom = BETA2 * precision + recall
    fbeta = np.divide((1 + BETA2) * precision * recall, denom, out=np.zeros_like(tp),
                      where=denom > 0)
    tpr, fpr = tp / n_pos, fp / n_neg  # decreasing in t
    auc = float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2))
    return {"mae": mae, "max_fbeta": float(fbeta[:256].max()), "auc": auc}


def load_items(data: Path, categories: list[str] | None, limit: int | None
               ) -> list[tuple[str, Path, Path]]:
    """(category, image path, mask path) for the chosen categories, sorted."""
    if categories is None:
        categories = sorted(p.name for p in data.iterdir() if (p / "images").is_dir()
                            and len(list_images(p / "images")) <= MAX_IMAGES_DEFAULT)
    items = []
    for cat in categories:
        folder = data / cat
        if not (folder / "images").is_dir():
            raise SystemExit(f"error: no category {cat!r} in {data}")
        paths = list_images(folder / "images")
        for p in paths[:limit] if limit else paths:
            items.append((cat, p, folder / "masks" / f"{p.stem}.png"))
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--categories", help="comma-separated (default: all with ≤ 40 images)")
    ap.add_argument("--limit-per-category", type=int, default=None)
    ap.add_argument("--methods", help=f"comma-separated (default: all of {sorted(METHODS)})")
    ap.add_argument("--work-max-side", type=int, default=CosegConfig.work_max_side)
    args = ap.parse_args(argv)

    methods = args.methods.split(",") if args.methods else list(METHODS)
    configs = {m: CosegConfig(prior=m, work_max_side=args.work_max_side) for m in methods}
    cats = args.categories.split(",") if args.categories else None
    items = load_items(args.data, cats, args.limit_per_category)
    if not items:
        raise SystemExit("error: no images selected")

    # Warm-up (ONNX session creation, imports) is kept out of the timings.
    warm = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for m in methods:
        compute_saliency(warm, configs[m])

    scores: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    seconds: dict[str, float] = {m: 0.0 for m in methods}
    for k, (_cat, img_path, mask_path) in enumerate(items):
        image = load_image(img_path).image
        ids = np.asarray(Image.open(mask_path))
        valid = ids != 255
        gt = (ids > 0) & valid
        for m in methods:
            t0 = time.perf_counter()
            sal = compute_saliency(image, configs[m])
            seconds[m] += time.perf_counter() - t0
            scores[m].append(score_map(sal, gt, valid))
        print(f"\r{k + 1}/{len(items)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    rows = []
    for m in methods:
        mean = {key: float(np.nanmean([s[key] for s in scores[m]])) for key in
                ("mae", "max_fbeta", "auc")}
        rows.append({"method": m, "trained": METHODS[m].trained, **mean,
                     "s_per_img": seconds[m] / len(items)})
    print(f"coco-dev: {len(items)} images, {len({c for c, _, _ in items})} categories, "
          f"work_max_side={args.work_max_side}")
    head = " | ".join(f"{h:>6s}" for h in ("MAE", "maxFβ", "AUC", "s/img"))
    print(f"| {'method':18s} | trained | {head} |")
    print(f"|{'-' * 20}|---------|--------|--------|--------|--------|")
    for r in rows:
        print(f"| {r['method']:18s} | {str(r['trained']).lower():7s} | {r['mae']:6.3f} | "
              f"{r['max_fbeta']:6.3f} | {r['auc']:6.3f} | {r['s_per_img']:6.3f} |")
    best = max(rows, key=lambda r: r["max_fbeta"])
    best_unsup = max((r for r in rows if not r["trained"]), key=lambda r: r["max_fbeta"],
                     default=None)
    print(json.dumps({"benchmark": "priors", "images": len(items),
                      "categories": sorted({c for c, _, _ in items}),
                      "work_max_side": args.work_max_side, "rows": rows,
                      "best": best["method"],
                      "best_unsupervised": best_unsup["method"] if best_unsup else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

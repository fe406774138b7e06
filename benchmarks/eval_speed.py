"""Time `coseg_cli.evaluate.evaluate` over all of coco-dev with ~20 predicted masks per image.

Predictions per image (deterministic, seeded): every GT instance (crowd included) once, a
shifted copy of each, then random boxes up to --per-image masks. They are written to a
temporary root in the `<category>/instances.json` layout, and only `evaluate()` is timed
(reading both JSON trees, rasterising GT polygons, matching, AP, CorLoc).

    python benchmarks/eval_speed.py [--data ../shared/data/coco-dev] [--per-image 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from coseg_cli.coco import decode, encode_masks, to_rle
from coseg_cli.evaluate import evaluate

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-dev"


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """bool[H,W] moved by (dy, dx) with zero fill (no wrap-around)."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def build_predictions(data: Path, out: Path, per_image: int, seed: int) -> int:
    """Write <out>/<category>/instances.json for every category of `data`; returns #masks."""
    rng = np.random.default_rng(seed)
    total = 0
    for cat_dir in sorted(p for p in data.iterdir() if (p / "annotations.json").is_file()):
        gt = json.loads((cat_dir / "annotations.json").read_text())
        by_image: dict[int, list[dict]] = {}
        for ann in gt["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        anns = []
        for im in gt["images"]:
            h, w = im["height"], im["width"]
            gt_masks = [decode(to_rle(a["segmentation"], h, w)) for a in by_image.get(im["id"], [])]
            masks = list(gt_masks)
            for m in gt_masks:
                if len(masks) >= per_image:
                    break
                dy, dx = (int(v) for v in rng.integers(-h // 10 - 1, h // 10 + 2, 2))
                masks.append(_shift(m, dy, dx))
            while len(masks) < per_image:
                y0, x0 = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
                y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
                box = np.zeros((h, w), bool)
                box[y0:y1, x0:x1] = True
                masks.append(box)
            masks = masks[:per_image]
            scores = rng.random(len(masks))
            for rle, score in zip(encode_masks(np.stack(masks)), scores, strict=True):
                anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": 1,
                             "segmentation": rle, "score": float(score)})
        total += len(anns)
        (out / cat_dir.name).mkdir(parents=True)
        (out / cat_dir.name / "instances.json").write_text(json.dumps(
            {"images": gt["images"], "annotations": anns, "categories": gt["categories"]}))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--per-image", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs; the best is reported")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="coseg-eval-bench-") as tmp:
        t0 = time.perf_counter()
        num_masks = build_predictions(args.data, Path(tmp), args.per_image, args.seed)
        print(f"built {num_masks} predicted masks in {time.perf_counter() - t0:.1f} s")
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            result = evaluate(args.data, Path(tmp))
            times.append(time.perf_counter() - t0)
    n_img = sum(int(r["n_images"] or 0) for r in result.per_category.values())
    print(f"categories {len(result.per_category)}, images {n_img}, mean {result.mean}")
    print(f"evaluate(): {min(times):.2f} s")


if __name__ == "__main__":
    main()

"""Where stage 2 loses ground-truth instances, per coco-dev category.

For each GT instance (at working resolution) it reports whether some candidate of the proposal
*pool* reaches IoU > t, whether the proposal a *peak picked* (eq. 7 argmax) does, and whether a
*final* instance (after NMS) does; plus the share of peaks that fall inside a GT instance and the
pixel AUC of the co-saliency map and of the prior against the union of the GT instances. Run
`benchmarks/quality.py` first with the same --cache and settings: the fine-tuned model,
priors and proposals come from its stage cache (missing entries are computed, not guessed).
It inspects the paper's "peaks" ranking (`instances.score_peaks`), whatever the preset's.

    python benchmarks/stage2_diagnosis.py --categories pizza,laptop --cache /tmp/coseg-quality/cache
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from scipy.stats import rankdata

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coseg_cli import images, instances, pipeline, ranking
from coseg_cli.coco import mask_iou
from coseg_cli.config import CosegConfig, preset_config
from coseg_cli.evaluate import load_gt_json
from coseg_cli.runtime import StageCache

DATA = REPO.parent / "shared" / "data" / "coco-dev"
THRESHOLDS = (0.25, 0.5)


def pixel_auc(score: np.ndarray, label: np.ndarray) -> float:
    """Mann–Whitney AUC of a map against a bool mask (every 4th pixel: ties and speed)."""
    s, y = score[::4, ::4].ravel(), label[::4, ::4].ravel()
    pos = int(y.sum())
    if pos == 0 or pos == y.size:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - pos * (pos + 1) / 2) / (pos * (y.size - pos)))


def diagnose_image(net, img, prior, masks, gt_masks, cfg: CosegConfig) -> dict[str, float]:
    ps = instances.score_peaks(net, img, masks, cfg, "cpu", chunk=4)
    iou = mask_iou(masks, gt_masks)  # [N,G]
    out: dict[str, float] = {}
    picked = np.zeros((0, len(gt_masks)))
    final = np.zeros((0, len(gt_masks)))
    if ps.scores.size:
        picked = iou[ps.scores.argmax(axis=1)]
        kept = ranking.select_instances(ps.scores, masks, nms_iou_thresh=cfg.nms_iou_thresh)
        final = iou[[k[1] for k in kept]]
    for t in THRESHOLDS:
        for name, table in (("pool", iou), ("picked", picked), ("final", final)):
            out[f"{name}@{t}"] = float((table.max(axis=0) > t).mean()) if len(table) else 0.0
    fg = gt_masks.any(axis=0)
    xs, ys = ps.peaks_xy[:, 0], ps.peaks_xy[:, 1]
    out["peaks_in_gt"] = float(fg[ys, xs].mean()) if len(xs) else 0.0
    out["auc_cosal"] = pixel_auc(ps.cosal, fg)
    out["auc_prior"] = pixel_auc(prior, fg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--categories", required=True, help="comma list")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/coseg-quality/cache"))
    args = ap.parse_args()
    cfg = preset_config(args.preset)
    rows: dict[str, dict[str, float]] = {}
    for cat in args.categories.split(","):
        records, _ = images.load_folder(args.data / cat / "images")
        gt = load_gt_json(args.data / cat / "annotations.json")
        cache = StageCache(args.cache / cat)
        works = [images.shrink_to(r.image, cfg.work_max_side) for r in records]
        sha1s = [r.sha1 for r in records]
        priors = pipeline.compute_priors(works, sha1s, cfg, cache)
        net, _, _ = pipeline.finetuned_model(works, priors, sha1s, cfg, "cpu", args.cache / cat)
        per_image = []
        for rec, img, prior in zip(records, works, priors):
            gt_img = gt.images[gt.lookup(rec.name, None)]
            h, w = img.shape[:2]
            gt_masks = np.stack([cv2.resize(mask_utils.decode(r), (w, h),
                                            interpolation=cv2.INTER_NEAREST)
                                 for r in gt_img.rles]).astype(bool)
            masks = pipeline.compute_proposals(img, prior, rec.sha1, cfg, cache).masks
            per_image.append(diagnose_image(net, img, prior, masks, gt_masks, cfg))
        rows[cat] = {k: float(np.nanmean([d[k] for d in per_image])) for k in per_image[0]}
        print(cat, " ".join(f"{k}={v:.3f}" for k, v in rows[cat].items()), flush=True)
    keys = next(iter(rows.values())).keys()
    print("mean", " ".join(f"{k}={np.mean([r[k] for r in rows.values()]):.3f}" for k in keys))


if __name__ == "__main__":
    main()

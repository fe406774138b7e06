"""Recall of mask proposals on coco-dev: how many GT instances some proposal covers.

For every image of every category folder (non-crowd instances of that folder's category), the best
IoU over the top-k proposals (by score) gives recall at IoU ≥ 0.5 / ≥ 0.7 and the average best
overlap (ABO), for k = 100, 300, 1000. Also seconds per image (wall and process CPU time; the CPU is
shared, so wall time can be inflated by other processes) and peak resident memory.

    python benchmarks/proposals.py [--categories apple,cup] [--limit-per-category 40]
        [--max-proposals 1000] [--prior none|METHOD] [--work-max-side 640]

Prints a table and, last, one JSON line with the same numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from coseg_cli import images as image_io
from coseg_cli.coco import mask_iou
from coseg_cli.config import CosegConfig
from coseg_cli.proposals import generate_proposals

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-dev"
KS = (100, 300, 1000)


def best_overlaps(masks: np.ndarray, gt_ids: np.ndarray, ks: tuple[int, ...]) -> np.ndarray:
    """Best IoU of each GT instance over the top-k proposals → float64[G, len(ks)].

    Args:
        masks: bool[N,H,W] proposals, best first. gt_ids: uint8[H,W] instance ids (0 bg, 255 crowd).
    """
    ids = [i for i in np.unique(gt_ids).tolist() if i not in (0, 255)]
    out = np.zeros((len(ids), len(ks)))
    if masks.shape[0] == 0 or not ids:
        return out
    iou = mask_iou(masks, np.stack([gt_ids == inst for inst in ids]))  # [N,G]
    for j, k in enumerate(ks):
        out[:, j] = iou[:k].max(axis=0)
    return out


def _parse_args(argv: list[str] | None, d: CosegConfig) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--categories", default="", help="comma-separated folder names (default all)")
    ap.add_argument("--limit-per-category", type=int, default=40)
    ap.add_argument("--max-proposals", type=int, default=max(KS))
    ap.add_argument("--method", default=d.proposal_method)
    ap.add_argument("--prior", default="none", help="saliency method name, or none")
    ap.add_argument("--work-max-side", type=int, default=d.work_max_side)
    return ap.parse_args(argv)


@dataclasses.dataclass
class Measured:
    """Best overlaps float64[G, len(ks)] per category (and per category run, in order); per
    image, seconds and proposal count."""

    per_cat: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    overlaps: list[np.ndarray] = dataclasses.field(default_factory=list)
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    counts: list[int] = dataclasses.field(default_factory=list)


def measure(args: argparse.Namespace, cats: list[str], cfg: CosegConfig, ks: tuple[int, ...]
            ) -> Measured:
    """Generate the proposals of every image of `cats` and score them against its GT."""
    compute_saliency = None
    if args.prior != "none":
        from coseg_cli.saliency import compute_saliency
    m = Measured()
    for cat in cats:
        paths = image_io.list_images(args.data / cat / "images")[: args.limit_per_category]
        cat_ov = []
        for path in paths:
            rec = image_io.load_image(path)
            gt = np.asarray(Image.open(args.data / cat / "masks" / f"{path.stem}.png"))
            prior = None
            if compute_saliency is not None:
                prior = compute_saliency(rec.image, cfg)
            t0, c0 = time.perf_counter(), time.process_time()
            props = generate_proposals(rec.image, cfg, prior=prior)
            m.wall.append(time.perf_counter() - t0)
            m.cpu.append(time.process_time() - c0)
            m.counts.append(len(props))
            cat_ov.append(best_overlaps(props.masks, gt, ks))
            del props
        r = m.per_cat[cat] = np.concatenate(cat_ov) if cat_ov else np.zeros((0, len(ks)))
        m.overlaps.append(r)
        print(f"{cat:14s} imgs {len(paths):3d} inst {len(r):4d}  "
              + "  ".join(f"R50@{k} {np.mean(r[:, j] >= 0.5):.3f}" for j, k in enumerate(ks)),
              file=sys.stderr, flush=True)
    return m


def main(argv: list[str] | None = None) -> int:
    d = CosegConfig()
    args = _parse_args(argv, d)
    cats = sorted(p.name for p in args.data.iterdir() if (p / "images").is_dir())
    if args.categories:
        wanted = args.categories.split(",")
        missing = sorted(set(wanted) - set(cats))
        if missing:
            print(f"unknown categories: {missing}", file=sys.stderr)
            return 2
        cats = wanted
    cfg = dataclasses.replace(d, proposal_method=args.method, max_proposals=args.max_proposals,
                              work_max_side=args.work_max_side,
                              prior=d.prior if args.prior == "none" else args.prior)
    ks = tuple(k for k in KS if k <= args.max_proposals) or (args.max_proposals,)
    m = measure(args, cats, cfg, ks)
    wall, cpu, counts, per_cat = m.wall, m.cpu, m.counts, m.per_cat

    allov = np.concatenate(m.overlaps)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = []
    print(f"\nproposals on {args.data.name}: {len(cats)} categories, {len(wall)} images, "
          f"{len(allov)} instances, prior={args.prior}, method={args.method}")
    print(f"{'k':>6} {'R@0.5':>7} {'R@0.7':>7} {'ABO':>7} {'catR@0.5':>9}")
    for j, k in enumerate(ks):
        cat_r = float(np.mean([np.mean(v[:, j] >= 0.5) for v in per_cat.values() if len(v)]))
        row = {"k": k, "recall@0.5": float(np.mean(allov[:, j] >= 0.5)),
               "recall@0.7": float(np.mean(allov[:, j] >= 0.7)), "abo": float(allov[:, j].mean()),
               "cat_mean_recall@0.5": cat_r}
        rows.append(row)
        print(f"{k:>6} {row['recall@0.5']:7.3f} {row['recall@0.7']:7.3f} {row['abo']:7.3f} "
              f"{cat_r:9.3f}")
    summary = {"images": len(wall), "instances": len(allov), "categories": len(cats),
               "prior": args.prior, "method": args.method, "max_proposals": args.max_proposals,
               "work_max_side": args.work_max_side, "rows": rows,
               "mean_proposals": float(np.mean(counts)) if counts else 0.0,
               "sec_per_image_wall": float(np.mean(wall)) if wall else 0.0,
               "sec_per_image_cpu": float(np.mean(cpu)) if cpu else 0.0,
               "max_sec_wall": float(np.max(wall)) if wall else 0.0,
               "peak_rss_mb": peak_mb}
    print(f"proposals/img {summary['mean_proposals']:.0f}  "
          f"s/img wall {summary['sec_per_image_wall']:.2f} "
          f"(cpu {summary['sec_per_image_cpu']:.2f}, max wall {summary['max_sec_wall']:.2f})  "
          f"peak RSS {peak_mb:.0f} MB")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality benchmark: run coseg over coco-dev categories and score with `coseg eval`.

Prints per-category mAP^r@.25/.5/.75, CorLoc^r and seconds per folder, the mean, and last one
JSON line. Stage caches are shared across runs (--cache), so variants that change only late
stages (ranking, NMS) re-use earlier work.

    python benchmarks/quality.py --categories pizza,umbrella --preset fast --set epochs=10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coseg_cli import export, images, pipeline  # noqa: E402
from coseg_cli.config import CosegConfig, preset_config  # noqa: E402
from coseg_cli.evaluate import evaluate  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "coco-dev"


def _parse_value(field: str, raw: str):
    typ = type(getattr(CosegConfig(), field))
    return typ(float(raw)) if typ is int else typ(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--categories", default="", help="comma list (default: all with <= 40 images)")
    ap.add_argument("--max-images", type=int, default=40)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="config override, repeatable")
    ap.add_argument("--out", type=Path, default=Path("/tmp/coseg-quality/out"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/coseg-quality/cache"))
    args = ap.parse_args()

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
    seconds = {}
    for cat in cats:
        t = time.time()
        records, _ = images.load_folder(args.data / cat / "images")
        result = pipeline.cosegment(records, cfg, cache_dir=args.cache / cat, category=cat)
        export.write_all(result, args.out / cat)
        seconds[cat] = time.time() - t
        stages = " ".join(f"{k}={v:.0f}" for k, v in result.timings.items() if k != "total")
        print(f"  ran {cat}: {len(records)} images, {len(result.instances)} instances, "
              f"{seconds[cat]:.1f} s ({stages})", flush=True)
    gt_root = args.out.parent / "gt"
    gt_root.mkdir(parents=True, exist_ok=True)
    for cat in cats:  # eval root mode: <category>/annotations.json beside <category>/instances.json
        link = gt_root / cat
        if not link.exists():
            link.symlink_to(args.data / cat)
    res = evaluate(gt_root, args.out).to_json()
    per = {c: res["per_category"][c] for c in cats}
    print(f"{'category':<14}{'AP25':>7}{'AP50':>7}{'AP75':>7}{'CorLoc':>8}{'s':>8}")
    for c in cats:
        r = per[c]
        print(f"{c:<14}{r['AP25']:7.1f}{r['AP50']:7.1f}{r['AP75']:7.1f}{r['CorLoc']:8.1f}"
              f"{seconds[c]:8.1f}")
    m = {k: round(sum(per[c][k2] for c in cats) / len(cats), 2)
         for k, k2 in (("mAP25", "AP25"), ("mAP50", "AP50"), ("mAP75", "AP75"),
                       ("CorLoc", "CorLoc"))}
    print(f"{'mean':<14}{m['mAP25']:7.1f}{m['mAP50']:7.1f}{m['mAP75']:7.1f}{m['CorLoc']:8.1f}"
          f"{sum(seconds.values()):8.1f}")
    print(json.dumps({**m, "seconds": round(sum(seconds.values()), 1), "categories": cats,
                      "preset": args.preset, "overrides": overrides, "prior": cfg.prior}))


if __name__ == "__main__":
    main()

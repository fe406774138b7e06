"""End-to-end speed: one real 10-image folder at default settings (or --preset/--set), no cache.

Prints seconds per stage and in total, peak memory (max RSS), and the machine's fp32 matmul
peak measured just before (train_speed.matmul_peak) with the total rescaled to the quiet-machine
reference peak, so a run on a contended machine can still be compared; last line one JSON object.

    python benchmarks/speed.py                      # coco-dev/cup, first 10 images, preset fast
    python benchmarks/speed.py --preset paper --images 10
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train_speed import matmul_peak

from coseg_cli import export, images, pipeline
from coseg_cli.config import CosegConfig, preset_config

REFERENCE_PEAK_GFLOPS = 175.6  # fp32 torch.mm 4096² on the quiet 2-core CI machine (BENCHMARKS.md)

DATA = REPO.parent / "shared" / "data" / "coco-dev"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=DATA / "cup" / "images")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--out", type=Path, default=Path("/tmp/coseg-speed"))
    args = ap.parse_args()
    defaults = CosegConfig()
    overrides = {}
    for item in args.set:
        field, _, raw = item.partition("=")
        typ = type(getattr(defaults, field))
        overrides[field] = typ(float(raw)) if typ is int else typ(raw)
    cfg = preset_config(args.preset, **overrides)

    paths = images.list_images(args.folder)[: args.images]
    records = [images.load_image(p, args.folder) for p in paths]
    peak = matmul_peak()
    t0 = time.perf_counter()
    result = pipeline.cosegment(records, cfg, cache_dir=None, category=args.folder.name)
    write = export.write_all(result, args.out)
    total = time.perf_counter() - t0
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    stages = {k: round(v, 1) for k, v in result.timings.items() if k != "total"}
    stages["write"] = round(sum(write.values()), 1)
    print(f"{len(records)} images from {args.folder}, preset {args.preset} {overrides}")
    for k, v in stages.items():
        print(f"  {k:<10}{v:8.1f} s")
    print(f"  {'total':<10}{total:8.1f} s   peak RSS {rss_gb:.2f} GB   "
          f"{len(result.instances)} instances")
    at_ref = total * peak / REFERENCE_PEAK_GFLOPS
    print(f"  matmul peak {peak:.1f} GFLOP/s now vs {REFERENCE_PEAK_GFLOPS} reference: "
          f"total at the reference peak ≈ {at_ref:.1f} s")
    print(json.dumps({"images": len(records), "preset": args.preset, "overrides": overrides,
                      "stages_s": stages, "total_s": round(total, 1),
                      "peak_rss_gb": round(rss_gb, 2), "peak_gflops": round(peak, 1),
                      "total_s_at_reference_peak": round(at_ref, 1)}))


if __name__ == "__main__":
    main()

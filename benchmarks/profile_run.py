"""Where a default run's time goes: cProfile over the whole run (the Python side, main thread)
and torch.profiler over the network's operators, on one real 10-image folder, no cache.

The proposal generator runs in a worker thread during the run (pipeline._ProposalPrefetch),
out of cProfile's sight; its own profile is taken on the folder's first image afterwards.
Prints the stage timings, the top functions by own time, the top torch operators by own CPU
time, and a last JSON line with the top items of each.

    python benchmarks/profile_run.py                # coco-dev/cup, first 10 images, preset fast
    python benchmarks/profile_run.py --top 25 --images 6
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from torch.profiler import ProfilerActivity, profile

from coseg_cli import images, pipeline, proposals, saliency
from coseg_cli.config import preset_config

DATA = REPO.parent / "shared" / "data" / "coco-dev"


def top_functions(prof: cProfile.Profile, top: int) -> list[dict[str, object]]:
    """The `top` functions by own (exclusive) time: name, calls, own and cumulative seconds."""
    stats = pstats.Stats(prof)
    rows = []
    for (path, line, name), (_, calls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(path).name}:{line}({name})" if line else name
        rows.append({"function": where, "calls": calls, "own_s": round(own, 2),
                     "cum_s": round(cum, 2)})
    return sorted(rows, key=lambda r: -float(r["own_s"]))[:top]


def top_ops(prof: profile, top: int) -> list[dict[str, object]]:
    """The `top` torch operators by own CPU time (seconds), with their call counts."""
    rows = [{"op": e.key, "calls": e.count, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 2)}
            for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -float(r["self_cpu_s"]))[:top]


def _print(title: str, rows: list[dict[str, object]]) -> None:
    print(f"\n{title}")
    for r in rows:
        print("  " + "  ".join(f"{k}={v}" for k, v in r.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=DATA / "cup" / "images")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    cfg = preset_config(args.preset)
    paths = images.list_images(args.folder)[: args.images]
    records = [images.load_image(p, args.folder) for p in paths]

    py = cProfile.Profile()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as tprof:
        py.enable()
        result = pipeline.cosegment(records, cfg, cache_dir=None, category=args.folder.name)
        py.disable()
    wall = time.perf_counter() - t0

    work = images.shrink_to(records[0].image, cfg.work_max_side)
    prior = saliency.compute_saliency(work, cfg)
    prop = cProfile.Profile()
    t1 = time.perf_counter()
    prop.runcall(proposals.generate_proposals, work, cfg, prior=prior)
    prop_s = time.perf_counter() - t1

    stages = {k: round(v, 1) for k, v in result.timings.items()}
    print(f"{len(records)} images from {args.folder}, preset {args.preset}, "
          f"torch threads {torch.get_num_threads()}; wall {wall:.1f} s under both profilers")
    print("stages (s): " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    funcs, ops = top_functions(py, args.top), top_ops(tprof, args.top)
    prop_funcs = top_functions(prop, args.top)
    _print("Python, main thread, by own time", funcs)
    _print("torch operators, by own CPU time", ops)
    _print(f"proposals of one image ({prop_s:.2f} s), by own time", prop_funcs)
    print(json.dumps({"images": len(records), "preset": args.preset, "wall_s": round(wall, 1),
                      "stages_s": stages, "proposals_one_image_s": round(prop_s, 2),
                      "top_functions": funcs[:5], "top_ops": ops[:5],
                      "top_proposal_functions": prop_funcs[:5]}))


if __name__ == "__main__":
    main()

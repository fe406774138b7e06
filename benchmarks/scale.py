"""How time and memory grow with the folder: `coseg run` on 10, 40 and 160 photos.

One folder per size, filled from coco-dev/person (132 photos; beyond that, left-right mirrored
copies of the first ones, re-encoded, so that no two files are the same photo — a mirrored photo
is a new image to every stage). Each size runs as its own `coseg run --no-cache` process (a fresh
OUT, default preset unless options follow `--`); its wall time and peak RSS (the child's max RSS,
read by a small wrapper process so that sizes do not mix) are printed as a table, then one JSON line
with `s_per_img_<n>`, `peak_rss_gb_<n>`, `s_per_img_ratio` (largest over smallest) and
`peak_rss_gb` (the largest). Minutes per size on a 2-core CPU: about a quarter of the size.

    python benchmarks/scale.py                    # 10, 40, 160
    python benchmarks/scale.py --sizes 10,40 -- --preset paper
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "coco-dev" / "person" / "images"

# Runs one command and prints its peak RSS in KiB: RUSAGE_CHILDREN of this wrapper holds only it.
RSS_WRAPPER = ("import resource, subprocess, sys\n"
               "code = subprocess.run(sys.argv[1:]).returncode\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(code)\n")


def build_folder(dest: Path, n: int, photos: list[Path]) -> int:
    """`n` photos in `dest`; returns how many are mirrored copies."""
    dest.mkdir(parents=True)
    mirrored = 0
    for i in range(n):
        src = photos[i % len(photos)]
        if i < len(photos):
            shutil.copy(src, dest / src.name)
            continue
        with Image.open(src) as im:
            flipped = ImageOps.mirror(im.convert("RGB"))
        flipped.save(dest / f"{src.stem}_mirror{i // len(photos)}.jpg", quality=95)
        mirrored += 1
    return mirrored


def run_size(folder: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one `coseg run`."""
    cmd = [sys.executable, "-c", RSS_WRAPPER, sys.executable, "-m", "coseg_cli", "run",
           str(folder), "--out", str(out), "--no-cache", "-q", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"coseg run failed on {folder}:\n{proc.stderr[-2000:]}")
    rss_kib = int(proc.stderr.strip().splitlines()[-1])
    return wall, rss_kib / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,40,160", help="comma list of folder sizes")
    ap.add_argument("run_options", nargs=argparse.REMAINDER,
                    help="after --: options passed on to `coseg run` (e.g. -- --preset paper)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    extra = [a for a in args.run_options if a != "--"]
    photos = sorted(DATA.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"no photos in {DATA}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder = Path(tmp) / f"person{n}"
            mirrored = build_folder(folder, n, photos)
            wall, rss = run_size(folder, Path(tmp) / f"out{n}", extra)
            rows[n] = {"s_per_img": wall / n, "peak_rss_gb": rss, "mirrored": mirrored}
            print(f"{n:5d} photos ({mirrored} mirrored): {wall:8.1f} s, {wall / n:6.2f} s/img, "
                  f"peak RSS {rss:5.2f} GiB", flush=True)
    lo, hi = min(sizes), max(sizes)
    summary = {f"s_per_img_{n}": round(r["s_per_img"], 2) for n, r in rows.items()}
    summary.update({f"peak_rss_gb_{n}": round(r["peak_rss_gb"], 3) for n, r in rows.items()})
    summary["s_per_img_ratio"] = round(rows[hi]["s_per_img"] / rows[lo]["s_per_img"], 3)
    summary["peak_rss_gb"] = round(max(r["peak_rss_gb"] for r in rows.values()), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""How fast `coseg run` stops on SIGTERM, in each stage of a default run.

Starts `coseg run FOLDER` (default preset, a fresh OUT each time) and sends SIGTERM after each
delay; prints the stage the run was in (from what its cache held when the signal left), the exit
code (143 expected) and the seconds from signal to exit. Last line: one JSON object. A timing,
so a benchmark, not a test (the machines are noisy).

    python benchmarks/signal_latency.py --folder examples/person --delays 3,10,25,45,70
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage_of(cache: Path) -> str:
    """The latest stage whose cache entries exist (the run is in the one after it)."""
    done = [s for s in ("prior", "model", "proposals", "instances")
            if (cache / s).is_dir() and any((cache / s).iterdir())]
    following = {"": "prior", "prior": "fine-tuning", "model": "proposals / stage 2",
                 "proposals": "proposals / stage 2", "instances": "stage 2 / export"}
    return following[done[-1] if done else ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=REPO / "examples" / "person")
    ap.add_argument("--delays", default="3,10,25,45,70", help="seconds, comma list")
    ap.add_argument("--timeout", type=float, default=60.0, help="give up waiting after this")
    args = ap.parse_args()
    rows = []
    for delay in (float(d) for d in args.delays.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            proc = subprocess.Popen([sys.executable, "-m", "coseg_cli", "run", str(args.folder),
                                     "--out", str(out), "-q"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env={**os.environ})
            time.sleep(delay)
            if proc.poll() is not None:
                rows.append({"delay_s": delay, "stage": "finished before the signal",
                             "exit": proc.returncode, "seconds_to_exit": None})
                continue
            stage = stage_of(out / "cache")
            sent = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=args.timeout)
                took = round(time.perf_counter() - sent, 2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                took = None
            rows.append({"delay_s": delay, "stage": stage, "exit": proc.returncode,
                         "seconds_to_exit": took})
        print(f"{delay:6.1f} s  {rows[-1]['stage']:<28} exit {rows[-1]['exit']:>4}  "
              f"{rows[-1]['seconds_to_exit']} s", flush=True)
    stopped = [r["seconds_to_exit"] for r in rows if r["seconds_to_exit"] is not None]
    print(json.dumps({"rows": rows, "max_seconds_to_exit": max(stopped) if stopped else None,
                      "all_143": all(r["exit"] == 143 for r in rows
                                     if r["seconds_to_exit"] is not None)}))


if __name__ == "__main__":
    main()

"""How fast `coseg run` stops on SIGTERM, in each stage of a default run on real photos.

For each stage, starts `coseg run FOLDER` (default preset, a fresh OUT) through a driver that
touches a marker file when the stage's own function is entered and then runs it as usual; the
signal leaves `--after` seconds after the marker appears, so it lands inside that stage's real
(native) work. Prints per stage the exit code (143 expected) and the seconds from signal to exit.
Last line: one JSON object. A timing, so a benchmark, not a test (tests/test_interrupt.py checks
the behaviour); the issue's bound is 2 s.

    python benchmarks/signal_latency.py --folder examples/person --after 1.0
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

STAGES = {"prior": "coseg_cli.saliency:compute_saliency",
          "proposals": "coseg_cli.proposals:generate_proposals",
          "fine-tuning": "coseg_cli.train:finetune",
          "stage 2": "coseg_cli.instances:image_stage2",
          "export": "coseg_cli.export:write_instance_masks"}

# Marks the stage function on entry, then runs it as usual (see the script).
PROBE = REPO / "tests" / "stage_probe.py"


def measure(target: str, folder: Path, after: float, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "entered"
        proc = subprocess.Popen([sys.executable, str(PROBE), target, str(marker), "run",
                                 str(folder), "--out", str(Path(tmp) / "out"), "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ}, cwd=REPO)
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(after)
        if proc.poll() is not None:
            return {"exit": proc.returncode, "seconds_to_exit": None,
                    "note": "finished before the signal"}
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
            took = round(time.perf_counter() - sent, 2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            took = None
        return {"exit": proc.returncode, "seconds_to_exit": took}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=REPO / "examples" / "person")
    ap.add_argument("--after", type=float, default=1.0,
                    help="seconds between entering the stage and the signal")
    ap.add_argument("--timeout", type=float, default=60.0, help="give up waiting after this")
    args = ap.parse_args()
    rows = {}
    for stage, target in STAGES.items():
        rows[stage] = measure(target, args.folder, args.after, args.timeout)
        print(f"{stage:<12} exit {rows[stage]['exit']:>4}  {rows[stage]['seconds_to_exit']} s",
              flush=True)
    stopped = [r["seconds_to_exit"] for r in rows.values() if r["seconds_to_exit"] is not None]
    print(json.dumps({"rows": rows, "max_seconds_to_exit": max(stopped) if stopped else None,
                      "all_143": all(r["exit"] == 143 for r in rows.values()
                                     if r["seconds_to_exit"] is not None)}))


if __name__ == "__main__":
    main()

"""Run the property tests of tests/test_fuzz.py with many more examples than CI does.

Each property (random bytes and every PIL mode/extreme size into the image loader, fuzzed JSON
into `coseg eval`/`merge`/`report`, random option values into CosegConfig, the RLE parser
against pycocotools) must give a result or one clear error, never a traceback, within the
deadline. Prints one row per property, then one JSON object as the last line.

    python3 benchmarks/fuzz.py                 # 1000 examples per property
    python3 benchmarks/fuzz.py --examples 200 --only eval
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_properties(examples: int):
    """tests/test_fuzz.py imported with COSEG_FUZZ_EXAMPLES set (it reads it at import)."""
    os.environ["COSEG_FUZZ_EXAMPLES"] = str(examples)
    os.environ.setdefault("COSEG_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("coseg_fuzz", REPO / "tests" / "test_fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=1000, help="examples per property")
    parser.add_argument("--only", default="", help="run properties whose name contains this")
    args = parser.parse_args()
    module = _load_properties(args.examples)
    props = [(name, fn) for name, fn in vars(module).items()
             if name.startswith("test_") and hasattr(fn, "hypothesis") and args.only in name]
    results: dict[str, dict] = {}
    t_all = time.perf_counter()
    print(f"{'property':<52} {'examples':>8} {'ok':>6} {'error':>6} {'seconds':>8}  result")
    for name, fn in props:
        module.OUTCOMES.clear()
        t0 = time.perf_counter()
        failure = None
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a falsified property is the result we report
            failure = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        seconds = time.perf_counter() - t0
        ok = sum(n for (_, outcome), n in module.OUTCOMES.items() if outcome == "ok")
        err = sum(n for (_, outcome), n in module.OUTCOMES.items() if outcome == "error")
        results[name] = {"examples": ok + err, "ok": ok, "error": err,
                         "seconds": round(seconds, 2), "failure": failure}
        print(f"{name:<52} {ok + err:>8} {ok:>6} {err:>6} {seconds:>8.1f}  "
              + ("FALSIFIED: " + failure.splitlines()[0][:200] if failure else "holds"),
              flush=True)
    failures = sorted(n for n, r in results.items() if r["failure"])
    print(json.dumps({"benchmark": "fuzz", "max_examples": args.examples,
                      "properties": results, "falsified": failures,
                      "seconds": round(time.perf_counter() - t_all, 1)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

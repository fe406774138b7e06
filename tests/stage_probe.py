"""Run `coseg ARGS` with one stage function marked: on entering it, touch MARKER.

    python tests/stage_probe.py [--repeat] MODULE:FUNCTION MARKER ARGS...

Used by tests/test_interrupt.py and benchmarks/signal_latency.py to send a signal while a run is
inside a given stage, without guessing from timings. The function is replaced on its module, and
every caller looks it up there at call time. With --repeat the stage's real work is done again
and again (up to 120 s) after the first call, so that a signal cannot miss it; without it the
stage runs once, as usual."""

import importlib
import sys
import time
from pathlib import Path

repeat = sys.argv[1] == "--repeat"
target, marker, *coseg_args = sys.argv[2:] if repeat else sys.argv[1:]
module_name, name = target.split(":")
module = importlib.import_module(module_name)
real = getattr(module, name)


def marked(*args, **kwargs):
    Path(marker).touch()
    result = real(*args, **kwargs)
    deadline = time.monotonic() + 120
    while repeat and time.monotonic() < deadline:
        result = real(*args, **kwargs)
    return result


setattr(module, name, marked)
sys.argv = ["coseg", *coseg_args]
from coseg_cli.cli import main  # after the stage function is replaced

main()

"""Signals in a real process, in every stage: SIGTERM (a scheduler's stop) or Ctrl-C exits
128 + the signal number with one `error:` line and no traceback, leaves no half-written output,
and the same command run again gives files byte-identical to an uninterrupted run.

Which stage the signal lands in is not left to timing: `stage_probe.py --repeat` wraps one of the
stage's own functions so that, on entering it, the process touches a marker file and then keeps
doing that stage's real work (calling the real function again) until a signal arrives; the test
waits for the marker and signals. How fast real native work answers a signal on real photos is
a timing, measured by `benchmarks/signal_latency.py`; here the bound only catches a hang."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coseg_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "bottle"
OPTIONS = ["--image-size", "64", "--epochs", "3", "--max-proposals", "40", "--work-max-side",
           "96", "--device", "cpu", "--seed", "0", "--prior", "spectral_residual"]
HANG_S = 10.0  # signal to exit; far above the real latency, so only a hang fails it

PROBE = Path(__file__).with_name("stage_probe.py")

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("in") / "bottle"
    folder.mkdir()
    for p in sorted(EXAMPLES.glob("*.jpg"))[:3]:
        shutil.copy(p, folder / p.name)
    return folder


NOT_COMPARED = {"manifest.json", "report.html"}  # timings; the report names OUT's own path


def _snapshot(out: Path, skip: set[str] = NOT_COMPARED) -> dict[str, bytes]:
    """Every output file except the cache and files that record timings or OUT's path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "cache" not in p.relative_to(out).parts
            and p.name not in skip and p.name != ".coseg.lock"}


def _run(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def reference(weights_ready, folder, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path_factory.mktemp("ref") / "out"
    _run(["run", str(folder), "--out", str(out), *OPTIONS])
    snap = _snapshot(out)
    assert "instances.json" in snap and any(k.startswith("labels/") for k in snap)
    return out, snap


def _parts(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".part" in p.name or p.name.endswith(".old")]


def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def _signal_in(target: str, args: list[str], tmp: Path, sig: signal.Signals = signal.SIGTERM
               ) -> tuple[int, str, float]:
    """Run `coseg ARGS` with `target` ("module:function") marked by stage_probe.py; signal it
    once the wrapped function has been entered. Returns exit code, stderr and seconds from the
    signal to exit."""
    marker = tmp / f"in-{target.split(':')[1]}"
    env = {**os.environ, "COSEG_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, str(PROBE), "--repeat", target, str(marker), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)
    try:
        t0 = time.monotonic()
        while not marker.exists() and proc.poll() is None and time.monotonic() - t0 < 240:
            time.sleep(0.01)
        assert marker.exists(), f"{target} was never entered:\n{proc.communicate()[1]}"
        sent = time.monotonic()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr, took


def _assert_stopped(code: int, stderr: str, took: float, sig: signal.Signals) -> None:
    assert code == 128 + int(sig), stderr
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"interrupted ({sig.name})" in lines[0], stderr
    assert took < HANG_S, f"{took:.1f} s from the signal to exit"


RUN_STAGES = {  # stage → the function the signal lands in, and the cache it must not finish
    "prior": ("coseg_cli.saliency:compute_saliency", "prior"),
    "proposals": ("coseg_cli.proposals:generate_proposals", "proposals"),
    "fine-tuning": ("coseg_cli.train:finetune", "model"),
    "stage 2": ("coseg_cli.instances:image_stage2", "instances"),
    "export": ("coseg_cli.export:write_instance_masks", None),
}


@pytest.mark.parametrize("stage", list(RUN_STAGES))
def test_sigterm_in_each_run_stage_then_rerun(stage, reference, folder, tmp_path):
    target, cache_kind = RUN_STAGES[stage]
    out = tmp_path / "out"
    code, stderr, took = _signal_in(target, ["run", str(folder), "--out", str(out), *OPTIONS],
                                    tmp_path)
    _assert_stopped(code, stderr, took, signal.SIGTERM)
    assert not (out / ".coseg.lock").exists()  # the run's lock goes with it
    assert not (out / "manifest.json").exists()  # absent manifest = incomplete folder
    assert not _parts(out)
    if cache_kind is not None:  # the interrupted stage left no entry; the next ones did not run
        assert _count(out / "cache" / cache_kind, "*") < 3
        assert not (out / "instances.json").exists() and not (out / "labels").exists()

    _run(["run", str(folder), "--out", str(out), *OPTIONS])
    assert _snapshot(out) == reference[1]
    assert not _parts(out)


def test_ctrl_c_mid_training_then_resume(reference, folder, tmp_path):
    out = tmp_path / "out"
    code, stderr, took = _signal_in("coseg_cli.train:finetune",
                                    ["run", str(folder), "--out", str(out), *OPTIONS], tmp_path,
                                    signal.SIGINT)
    _assert_stopped(code, stderr, took, signal.SIGINT)
    assert _count(out / "cache" / "prior", "*.npz") == 3  # finished stages are kept
    assert _count(out / "cache" / "model", "*.pt") == 0
    _run(["run", str(folder), "--out", str(out), *OPTIONS])
    assert _snapshot(out) == reference[1]


def test_sigterm_in_eval(reference, tmp_path):
    pred = reference[0] / "instances.json"
    args = ["eval", "--gt", str(REPO / "examples" / "bottle-annotations.json"), "--pred",
            str(pred), "--json"]
    code, stderr, took = _signal_in("coseg_cli.evaluate:evaluate_category", args, tmp_path)
    _assert_stopped(code, stderr, took, signal.SIGTERM)
    assert "no half-written file" in stderr
    assert json.loads(_run(args))  # the same command, uninterrupted, still answers


def test_sigterm_in_merge_then_rerun(reference, tmp_path):
    clean, out = tmp_path / "clean", tmp_path / "merged"
    _run(["merge", str(reference[0]), "--out", str(clean), "--copy"])
    expected = _snapshot(clean, {"report.html"})
    code, stderr, took = _signal_in("coseg_cli.merge:combined_coco",
                                    ["merge", str(reference[0]), "--out", str(out), "--copy"],
                                    tmp_path)
    _assert_stopped(code, stderr, took, signal.SIGTERM)
    assert not _parts(out)
    _run(["merge", str(reference[0]), "--out", str(out), "--copy"])
    assert _snapshot(out, {"report.html"}) == expected


def test_sigterm_in_report_then_rerun(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out, ignore=shutil.ignore_patterns("cache", "report.html"))
    code, stderr, took = _signal_in("coseg_cli.report:summarize", ["report", str(out)], tmp_path)
    _assert_stopped(code, stderr, took, signal.SIGTERM)
    assert not (out / "report.html").exists() and not _parts(out)
    _run(["report", str(out)])
    assert (out / "report.html").is_file()

"""Ctrl-C in a real process: exit 130 with one `error:` line, no half-written output, and a re-run
finishes with files byte-identical to an uninterrupted run (mid fine-tuning and mid export)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from coseg_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "bottle"
OPTIONS = ["--image-size", "64", "--epochs", "3", "--max-proposals", "40", "--work-max-side",
           "96", "--device", "cpu", "--seed", "0", "--prior", "spectral_residual"]

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three photos plus a 4000 px one sorted last, whose full-resolution export takes long
    enough (about a second) to be interrupted."""
    folder = tmp_path_factory.mktemp("in") / "bottle"
    folder.mkdir()
    photos = sorted(EXAMPLES.glob("*.jpg"))[:3]
    for p in photos:
        shutil.copy(p, folder / p.name)
    with Image.open(photos[0]) as img:
        img.convert("RGB").resize((4000, 2640), Image.Resampling.BILINEAR).save(
            folder / "zz_large.jpg", quality=90)
    return folder


NOT_COMPARED = {"manifest.json", "report.html"}  # timings; the report names OUT's own path


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every output file except the cache and files that record timings or OUT's path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "cache" not in p.relative_to(out).parts
            and p.name not in NOT_COMPARED}


@pytest.fixture(scope="module")
def reference(weights_ready, folder, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "out"
    r = runner.invoke(app, ["run", str(folder), "--out", str(out), *OPTIONS])
    assert r.exit_code == 0, r.output
    snap = _snapshot(out)
    assert "instances.json" in snap and any(k.startswith("labels/") for k in snap)
    return snap


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240.0) -> bool:
    """Poll until ready() (True) or the process ended / timed out (False)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(0.01)
    return False


def _interrupt(folder: Path, out: Path, ready, delay: float = 0.0
               ) -> tuple[int, str]:
    env = {**os.environ, "COSEG_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "coseg_cli", "run", str(folder), "--out",
                             str(out), *OPTIONS], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        if _wait_for(proc, ready):
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr


def _parts(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".part" in p.name or p.name.endswith(".old")]


def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def _assert_interrupted_cleanly(code: int, stderr: str) -> None:
    assert code == 130, stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "interrupted (SIGINT)" in lines[0], stderr


def test_interrupt_mid_training_then_resume(reference, folder, tmp_path):
    out = tmp_path / "out"
    n = len(list(folder.glob("*.jpg")))
    # All priors cached → stage 1 (weights, fine-tuning) runs next; signal shortly after.
    code, stderr = _interrupt(folder, out, lambda: _count(out / "cache" / "prior", "*.npz") >= n,
                              delay=0.3)
    _assert_interrupted_cleanly(code, stderr)
    assert not (out / ".coseg.lock").exists()  # the run's lock goes with it
    assert _count(out / "cache" / "model", "*.pt") == 0  # fine-tuning had not finished
    assert not (out / "instances.json").exists() and not (out / "manifest.json").exists()
    assert not (out / "labels").exists()
    assert not _parts(out)
    assert _count(out / "cache" / "prior", "*.npz") == n  # finished stages are kept

    r = runner.invoke(app, ["run", str(folder), "--out", str(out), *OPTIONS])
    assert r.exit_code == 0, r.output
    assert _snapshot(out) == reference
    assert not _parts(out)


def test_interrupt_mid_export_then_resume(reference, folder, tmp_path):
    out = tmp_path / "out"
    # The first image's masks folder appears → export has started; zz_large.jpg comes last.
    code, stderr = _interrupt(folder, out, lambda: (out / "masks").is_dir())
    assert "Traceback" not in stderr
    if code == 130:  # the usual case; exit 0 only if export won the race
        _assert_interrupted_cleanly(code, stderr)
        assert not (out / "manifest.json").exists()  # absent manifest = incomplete folder
    else:
        assert code == 0, stderr
    assert not _parts(out) and not (out / ".coseg.lock").exists()
    if (out / "manifest.json").exists():  # a manifest is only ever beside complete outputs
        assert _snapshot(out) == reference

    r = runner.invoke(app, ["run", str(folder), "--out", str(out), *OPTIONS])
    assert r.exit_code == 0, r.output
    assert _snapshot(out) == reference
    assert not _parts(out)

"""End to end on a tiny real folder (bundled examples, small size, 1 epoch, CPU): every output
exists and parses, eval accepts it, a re-run reuses the caches and gives identical files, and a
failing folder among good ones gives exit 1 with the good ones written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from coseg_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "bottle"
TINY = ["--image-size", "64", "--epochs", "1", "--max-proposals", "40", "--work-max-side",
        "96", "--device", "cpu", "--seed", "0", "--prior", "spectral_residual"]

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("in") / "bottle"
    folder.mkdir()
    for p in sorted(EXAMPLES.glob("*.jpg"))[:3]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def first_run(weights_ready, tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "run"
    r = runner.invoke(app, ["run", str(tiny_folder), "--out", str(out), "--json", *TINY])
    assert r.exit_code == 0, r.output
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "cache" not in p.parts
            and p.name not in ("manifest.json", "report.html")}  # these two hold timings


def test_every_output_exists_and_parses(first_run, tiny_folder):
    from pycocotools.coco import COCO

    out = first_run
    data = json.loads((out / "instances.json").read_text())
    assert {i["file_name"] for i in data["images"]} == {p.name for p in tiny_folder.iterdir()}
    assert data["categories"][0]["name"] == "bottle"
    coco = COCO(str(out / "instances.json"))
    assert len(coco.getImgIds()) == 3
    res = coco.loadRes(data["annotations"]) if data["annotations"] else None
    assert res is None or len(res.getAnnIds()) == len(data["annotations"])
    for ann in data["annotations"]:
        assert {"segmentation", "bbox", "area", "score", "peak"} <= set(ann)
    for img in data["images"]:
        stem = Path(img["file_name"]).stem
        labels = np.asarray(Image.open(out / "labels" / f"{stem}.png"))
        assert labels.shape == (img["height"], img["width"])
        n = sum(1 for a in data["annotations"] if a["image_id"] == img["id"])
        assert len(list((out / "masks" / stem).glob("*.png"))) == n
        assert labels.max() <= n
        assert Image.open(out / "overlays" / f"{stem}.jpg").size == (img["width"], img["height"])
        assert Image.open(out / "cosaliency" / f"{stem}.png").size == (img["width"], img["height"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["epochs"] == 1 and manifest["seed"] == 0
    assert len(manifest["inputs"]) == 3 and all(len(i["sha1"]) == 40 for i in manifest["inputs"])
    assert manifest["weights"]["sha256"] and "torch" in manifest["environment"]
    assert manifest["prior_trained"] is False
    assert {"prior", "train", "proposals", "instances"} <= set(manifest["timings_s"])


def test_eval_accepts_the_run(first_run):
    gt = REPO / "examples" / "bottle-annotations.json"
    r = runner.invoke(app, ["eval", "--gt", str(gt), "--pred", str(first_run), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert set(result["mean"]) == {"mAP25", "mAP50", "mAP75", "CorLoc"}


def test_rerun_reuses_caches_and_is_identical(first_run, tiny_folder):
    before = _snapshot(first_run)
    r = runner.invoke(app, ["run", str(tiny_folder), "--out", str(first_run), *TINY])
    assert r.exit_code == 0, r.output
    assert _snapshot(first_run) == before
    manifest = json.loads((first_run / "manifest.json").read_text())
    hits = manifest["cache_hits"]
    assert hits.get("prior") == 3 and hits.get("proposals") == 3 and hits.get("instances") == 3
    assert manifest["train"]["cached"] is True


def test_failing_folder_among_good_ones(weights_ready, tiny_folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "only.jpg").write_bytes(b"not an image")
    out = tmp_path / "o"
    r = runner.invoke(app, ["run", str(bad), str(tiny_folder), "--out", str(out), "--json",
                            *TINY])
    assert r.exit_code == 1
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["status"] for x in lines] == ["error", "ok"]
    assert (out / "bottle" / "instances.json").is_file()
    assert not (out / "bad" / "instances.json").exists()


def test_a_stage_two_option_reruns_stage_two_only(first_run, tiny_folder, tmp_path):
    """A stage-2 option (here the contrast ring of the default "common" ranking) reuses priors,
    proposals and the fine-tuned model but recomputes and re-scores the instances."""
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    r = runner.invoke(app, ["run", str(tiny_folder), "--out", str(out), *TINY,
                            "--ring-px", "24"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["ring_px"] == 24
    hits = manifest["cache_hits"]
    assert hits.get("prior") == 3 and hits.get("proposals") == 3 and "instances" not in hits
    assert manifest["train"]["cached"] is True

    def scores(folder: Path) -> list[float]:
        data = json.loads((folder / "instances.json").read_text())
        return [a["score"] for a in data["annotations"]]

    assert scores(out) and scores(out) != scores(first_run)


def test_changed_option_into_a_used_out_equals_a_fresh_run(first_run, tiny_folder, tmp_path):
    """Issue 12's stale-cache case: a proposals option changed between two runs into one OUT
    must give byte for byte what a fresh run of the second command gives."""
    used = tmp_path / "used"
    shutil.copytree(first_run, used)
    changed = [*TINY, "--min-area-frac", "0.05"]
    r = runner.invoke(app, ["run", str(tiny_folder), "--out", str(used), *changed])
    assert r.exit_code == 0, r.output
    hits = json.loads((used / "manifest.json").read_text())["cache_hits"]
    assert hits.get("prior") == 3 and "proposals" not in hits and "instances" not in hits
    fresh = tmp_path / "fresh"
    r = runner.invoke(app, ["run", str(tiny_folder), "--out", str(fresh), *changed])
    assert r.exit_code == 0, r.output
    assert _snapshot(used) == _snapshot(fresh)
    assert _snapshot(used) != _snapshot(first_run)

"""End to end on a tiny real folder (bundled examples, small size, 1 epoch, CPU): every output
exists and parses, eval accepts it, a re-run reuses the caches and gives identical files, and a
failing folder among good ones gives exit 1 with the good ones written; --no-cache and --force
do what they say, a manifest replays its run, and the Python API on arrays matches the CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image, global_state
from PIL import Image
from typer.testing import CliRunner

from coseg_cli.cli import app
from coseg_cli.config import CosegConfig, preset_config
from coseg_cli.errors import InputError
from coseg_cli.manifest import read_manifest

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


def _run_into(tmp_path_factory, name: str, folder: Path, *options: str) -> Path:
    """`coseg run FOLDER` into a fresh OUT under a module-scoped temp folder; must succeed."""
    out = tmp_path_factory.mktemp(name) / "run"
    r = runner.invoke(app, ["run", str(folder), "--out", str(out), *options])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def first_run(weights_ready, tiny_folder, tmp_path_factory) -> Path:
    return _run_into(tmp_path_factory, "out", tiny_folder, "--json", *TINY)


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
    assert data["annotations"]  # the tiny run finds instances (20 per image at this size)
    res = coco.loadRes(data["annotations"])
    assert len(res.getAnnIds()) == len(data["annotations"])
    assert set(res.getImgIds()) <= set(coco.getImgIds())
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
    # the file is exactly what the typed record writes, and reads back into it
    typed = read_manifest(out)
    assert typed.to_json() == manifest
    assert typed.config == CosegConfig.from_dict(manifest["config"])
    assert typed.category == "bottle" and typed.counts.images == 3
    assert typed.counts.instances == len(data["annotations"])
    assert typed.weights is not None and typed.train is not None and typed.train.history


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


# --------------------------------------------------------------------------- cache, replay, API
# Stage 2 at the training size instead of the fast preset's 640 px: a run takes seconds.
LIGHT = [*TINY, "--infer-size", "64"]


@pytest.fixture(scope="module")
def light_run(weights_ready, tiny_folder, tmp_path_factory) -> Path:
    return _run_into(tmp_path_factory, "light", tiny_folder, "--quiet", *LIGHT)


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cache_of(run: Path, out: Path) -> dict[str, int]:
    """A new OUT holding only `run`'s cache (outputs absent, so they must be recomputed);
    returns the cache files' mtimes (copytree keeps the originals')."""
    shutil.copytree(run / "cache", out / "cache")
    mtimes = _mtimes(out / "cache")
    assert {k.split("/")[0] for k in mtimes} == {"prior", "proposals", "instances", "model"}
    return mtimes


def test_no_cache_neither_reads_nor_writes_the_cache(light_run, tiny_folder, tmp_path):
    """--no-cache with every stage cached in OUT: nothing is read from the cache (no hits, the
    network is trained), no cache file is added or rewritten, and the outputs are the cached
    run's."""
    out = tmp_path / "run"
    before = _cache_of(light_run, out)
    r = runner.invoke(app, ["run", str(tiny_folder), "--out", str(out), "--no-cache", *LIGHT])
    assert r.exit_code == 0, r.output
    manifest = _manifest(out)
    assert manifest["cache_hits"] == {}
    assert manifest["train"]["cached"] is False and manifest["train"]["steps"] > 0
    assert _mtimes(out / "cache") == before
    assert _snapshot(out) == _snapshot(light_run)


def test_force_recomputes_every_cached_stage(light_run, tiny_folder, tmp_path):
    """--force with every stage cached in OUT: nothing is read, each entry is written anew (an
    entry this config does not produce is dropped), and the outputs are the cached run's."""
    out = tmp_path / "run"
    before = _cache_of(light_run, out)
    stale = out / "cache" / "prior" / "0123456789abcdef.npz"
    stale.write_bytes(b"an entry of another config")
    r = runner.invoke(app, ["run", str(tiny_folder), "--out", str(out), "--force", *LIGHT])
    assert r.exit_code == 0, r.output
    manifest = _manifest(out)
    assert manifest["cache_hits"] == {}
    assert manifest["train"]["cached"] is False and manifest["train"]["steps"] > 0
    after = _mtimes(out / "cache")
    assert not stale.exists()
    assert set(after) == set(before)  # the same keys ...
    assert all(after[k] != before[k] for k in after)  # ... each one recomputed
    assert _snapshot(out) == _snapshot(light_run)


def test_replaying_a_manifest_gives_the_same_outputs(light_run, tiny_folder, tmp_path):
    """`coseg run FOLDER --config OUT/manifest.json` and no other option re-creates the run:
    its config comes from the manifest (it is not the default preset's) and every output is
    byte-identical."""
    recorded = _manifest(light_run)["config"]
    assert CosegConfig.from_dict(recorded) != preset_config()
    out = tmp_path / "replay"
    r = runner.invoke(app, ["run", str(tiny_folder), "--out", str(out), "--quiet", "--config",
                            str(light_run / "manifest.json")])
    assert r.exit_code == 0, r.output
    assert _manifest(out)["config"] == recorded
    assert _snapshot(out) == _snapshot(light_run)


def test_python_api_on_arrays_gives_the_cli_results(light_run, tiny_folder, tmp_path,
                                                   monkeypatch):
    """README's Python API: `cosegment` on in-memory RGB arrays writes nothing and returns what
    the CLI computed for the same pixels and config; `export.write_all` writes it."""
    from coseg_cli import cosegment
    from coseg_cli.export import write_all
    from coseg_cli.images import load_folder

    arrays = [rec.image.copy() for rec in load_folder(tiny_folder)[0]]
    cfg = CosegConfig.from_dict(_manifest(light_run)["config"])
    monkeypatch.chdir(tmp_path)
    result = cosegment(arrays, cfg)
    assert list(tmp_path.iterdir()) == []  # no cache, no output
    assert [rec.name for rec in result.images] == ["image_000.png", "image_001.png",
                                                   "image_002.png"]
    assert all(np.array_equal(rec.image, a) for rec, a in zip(result.images, arrays))
    assert result.config == dataclasses.asdict(cfg)
    assert [c.shape for c in result.cosaliency] == [a.shape[:2] for a in arrays]
    assert all(c.dtype == np.float32 and 0 <= c.min() and c.max() <= 1
               for c in result.cosaliency)
    for i, a in enumerate(arrays):
        mine = [inst for inst in result.instances if inst.image_index == i]
        assert [inst.rank for inst in mine] == list(range(1, len(mine) + 1))
        assert all(inst.mask.dtype == bool and inst.mask.shape == a.shape[:2] for inst in mine)
        assert [inst.score for inst in mine] == sorted((inst.score for inst in mine),
                                                       reverse=True)

    out = tmp_path / "api"
    write_all(result, out)
    api = json.loads((out / "instances.json").read_text())
    cli = json.loads((light_run / "instances.json").read_text())
    assert api["annotations"] and api["annotations"] == cli["annotations"]
    for a, c in zip(api["images"], cli["images"], strict=True):
        assert (a["id"], a["height"], a["width"]) == (c["id"], c["height"], c["width"])
        stem_a, stem_c = Path(a["file_name"]).stem, Path(c["file_name"]).stem
        for sub in ("labels", "cosaliency"):
            assert (out / sub / f"{stem_a}.png").read_bytes() == \
                (light_run / sub / f"{stem_c}.png").read_bytes(), (sub, stem_c)


def test_python_api_rejects_bad_arrays():
    """One image, or arrays that are not uint8 RGB, are InputErrors naming the problem."""
    from coseg_cli import cosegment

    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InputError, match="at least 2 images"):
        cosegment([img])
    with pytest.raises(InputError, match="image 1: expected uint8"):
        cosegment([img, img.astype(np.float32)])
    with pytest.raises(InputError, match="image 0: expected uint8"):
        cosegment([img[:, :, 0], img])


def test_cosegment_into_frees_each_image_once_the_sink_has_it(weights_ready):
    """The streaming core sends every co-saliency map during stage 2, then every image's
    instances, in image order, and keeps none of them: each map and mask is freed as soon as a
    sink that does not keep it returns (what lets `coseg run` hold a big folder in flat memory)."""
    import weakref

    from coseg_cli.pipeline import cosegment_into

    calls: list[tuple[str, int]] = []
    sent: list[weakref.ref] = []

    def alive() -> int:
        return sum(r() is not None for r in sent)

    class Probe:
        def add_cosaliency(self, index, cosal):
            assert alive() == 0  # the maps sent before are gone
            assert cosal.shape == (128, 160) and cosal.dtype == np.float32
            calls.append(("cosaliency", index))
            sent.append(weakref.ref(cosal))

        def add_instances(self, index, instances):
            assert alive() == 0  # so are the maps and the other images' masks
            assert [t.rank for t in instances] == list(range(1, len(instances) + 1))
            assert all(t.image_index == index and t.mask.shape == (128, 160) for t in instances)
            calls.append(("instances", index))
            sent.extend(weakref.ref(t.mask) for t in instances)

    # 128×160 photos: stage 2 works at 77×96 (work_max_side), masks and maps come back upscaled
    images = [np.pad(blob_image(64, seed=i).repeat(2, 0).repeat(2, 1), ((0, 0), (16, 16), (0, 0)))
              for i in range(3)]
    summary = cosegment_into(images, _api_config(), Probe())
    assert calls == [("cosaliency", i) for i in range(3)] + [("instances", i) for i in range(3)]
    assert alive() == 0
    assert sum(summary.instances_per_image) == len(sent) - 3 > 0
    assert len(summary.cosaliency_means) == 3


# --------------------------------------------------------------------------- global state
def _api_config() -> CosegConfig:
    """The light run's settings with 2 threads (the `unusual_state` fixture sets 1)."""
    return preset_config(image_size=64, epochs=1, max_proposals=40, work_max_side=96,
                         device="cpu", seed=0, prior="spectral_residual", infer_size=64,
                         num_threads=2)


def test_cosegment_leaves_global_state_as_it_found_it(weights_ready, unusual_state):
    """Threads, determinism, random states, $CUBLAS_WORKSPACE_CONFIG and the socket timeout are
    the caller's again after a call, though the run used its own (2 threads, recorded)."""
    from coseg_cli import cosegment

    before = global_state()
    result = cosegment([blob_image(64, seed=i) for i in range(2)], _api_config())
    assert result.environment["torch_threads"] == 2 != before["threads"]
    assert global_state() == before


def test_cosegment_restores_global_state_when_a_stage_raises(unusual_state, monkeypatch):
    """A stage that raises inside the call saw the run's settings; the caller gets its own back."""
    import torch

    from coseg_cli import cosegment, pipeline

    seen = []

    def failing_priors(*args, **kwargs):
        seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))
        raise InputError("a stage failed")

    monkeypatch.setattr(pipeline, "compute_priors", failing_priors)
    before = global_state()
    with pytest.raises(InputError, match="a stage failed"):
        cosegment([blob_image(64, seed=i) for i in range(2)], _api_config())
    assert seen == [(2, True)]
    assert global_state() == before


def test_prefetched_proposals_equal_the_sequential_ones_and_skip_cached_images(tmp_path):
    """The worker thread's proposals are the ones computed in the caller's thread; an image
    whose proposals are cached is not regenerated (nothing is started for it)."""
    from coseg_cli import pipeline, saliency
    from coseg_cli.runtime import StageCache

    cfg = preset_config("fast", prior="spectral_residual", max_proposals=40, work_max_side=96)
    works = [blob_image(96, seed=s) for s in range(3)]
    priors = [saliency.compute_saliency(w, cfg) for w in works]
    sha1s = ["a" * 40, "b" * 40, "c" * 40]
    cache = StageCache(tmp_path / "cache")
    direct = pipeline.compute_proposals(works[1], priors[1], sha1s[1], cfg, StageCache(None))
    pipeline.compute_proposals(works[2], priors[2], sha1s[2], cfg, cache)  # image 2 cached
    prefetch = pipeline._ProposalPrefetch(works, priors, sha1s, cfg, cache)
    try:
        for i in range(4):  # 3 is past the end: nothing to start
            prefetch.start(i)
        assert prefetch.take(2) is None and prefetch.take(3) is None
        pending = prefetch.take(1)
        assert pending is not None
        got = pipeline.compute_proposals(works[1], priors[1], sha1s[1], cfg, cache, pending)
    finally:
        prefetch.close()
    assert len(got) > 0 and np.array_equal(got.masks, direct.masks)
    # the caller wrote image 1's entry from the worker's result: a cache hit now, read back as
    # the same atoms, scores and sources
    hit = pipeline.compute_proposals(works[1], priors[1], sha1s[1], cfg, cache)
    for field in ("atom_map", "members", "scores"):
        assert np.array_equal(getattr(hit, field), getattr(direct, field))
    assert hit.sources == direct.sources

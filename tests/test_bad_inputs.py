"""A corpus of bad and odd inputs, generated here: each gets one `error:` line with its documented
exit code and no traceback (and nothing left behind in OUT), or a correct result.

Exit codes: 0 success; 1 a CosegError (bad input, unwritable output, failed folder); 2 a usage
error (bad option value, missing argument); 130 interrupted (tests/test_interrupt.py)."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import manifest_text
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from coseg_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "bottle"
GT = REPO / "examples" / "bottle-annotations.json"
TINY = ["--image-size", "64", "--epochs", "1", "--max-proposals", "40", "--work-max-side",
        "96", "--device", "cpu", "--seed", "0", "--prior", "spectral_residual"]

runner = CliRunner()


# --------------------------------------------------------------------------- corpus makers


def _photo(i: int = 0) -> Path:
    return sorted(EXAMPLES.glob("*.jpg"))[i]


def _good(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shutil.copy(_photo(i), folder / _photo(i).name)
    return folder


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def make_zero_byte(path: Path) -> None:
    path.write_bytes(b"")


def make_truncated_jpeg(path: Path) -> None:
    data = _photo(0).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_text_as_jpg(path: Path) -> None:
    path.write_text("this is not an image\n")


def make_cmyk_jpeg(path: Path) -> None:
    path.write_bytes(_jpeg_bytes(Image.open(_photo(2)).convert("CMYK"), quality=90))


def make_16bit_png(path: Path) -> None:
    grey = np.asarray(Image.open(_photo(3)).convert("L"), np.uint16) * 257
    Image.fromarray(grey).save(path)  # mode I;16
    assert Image.open(path).mode.startswith("I;16")


def make_palette_png(path: Path) -> None:
    img = Image.open(_photo(4)).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE,
                                                       colors=64)
    img.save(path, transparency=0)


EXIF_STORED_WH = (96, 64)  # stored landscape; orientation 6 = shown rotated, 64 wide × 96 high


def make_exif_rotated(path: Path) -> None:
    img = Image.open(_photo(5)).convert("RGB").resize(EXIF_STORED_WH)
    exif = Image.Exif()
    exif[0x0112] = 6
    path.write_bytes(_jpeg_bytes(img, exif=exif.tobytes(), quality=90))


def make_1x1(path: Path) -> None:
    Image.new("RGB", (1, 1), (200, 30, 30)).save(path)


def make_strip(path: Path) -> None:
    """20000×100: far wider than tall (the working image is 1 px high)."""
    img = Image.new("RGB", (20000, 100), (70, 120, 160))
    ImageDraw.Draw(img).rectangle((9000, 20, 11000, 80), fill=(230, 210, 40))
    img.save(path, quality=85)


def make_huge(path: Path) -> None:
    """12000×9000 (108 Mpx, over Pillow's 89 Mpx bomb warning): a cheap flat-colour JPEG."""
    img = Image.new("RGB", (12000, 9000), (90, 140, 200))
    draw = ImageDraw.Draw(img)
    draw.ellipse((2000, 2000, 6000, 7000), fill=(230, 200, 40))
    draw.ellipse((7000, 3000, 10000, 6000), fill=(200, 40, 40))
    img.save(path, quality=80)


def make_pixel_bomb(path: Path) -> None:
    """A valid PNG header claiming 20000×20000 (400 Mpx): rejected before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                     chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------- checks


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.lstrip().startswith("error:")]


def _assert_one_error(result, code: int, *needles: str) -> str:
    text = result.output
    assert result.exit_code == code, text
    assert "Traceback" not in text
    lines = _error_lines(text)
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _assert_nothing_left(out: Path) -> None:
    """A failed folder leaves no result files, no temp files (and no empty OUT it created)."""
    if not out.exists():
        return
    leftovers = [p for p in out.rglob("*") if p.name in ("instances.json", "manifest.json")
                 or ".part" in p.name]
    assert not leftovers, leftovers


def _run(*args: str):
    return runner.invoke(app, ["run", *map(str, args), *TINY])


# --------------------------------------------------------------------------- error cases

BAD_FILES = {
    "zero-byte file": (make_zero_byte, "empty.jpg", "empty file"),
    "truncated JPEG": (make_truncated_jpeg, "cut.jpg", "truncated"),
    "text file named .jpg": (make_text_as_jpg, "notes.jpg", "not a readable image"),
    "image over 250 Mpx": (make_pixel_bomb, "bomb.png", "larger than"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_unreadable_file_among_good_ones(kind, tmp_path):
    make, name, needle = BAD_FILES[kind]
    folder = _good(tmp_path / "in")
    make(folder / name)
    out = tmp_path / "out"
    line = _assert_one_error(_run(folder, "--out", out), 1, name, needle, "--skip-bad")
    assert str(folder) in line
    _assert_nothing_left(out)
    assert not out.exists()  # OUT was created by the run: removed again


def test_skip_bad_leaving_too_few_images(tmp_path):
    folder = _good(tmp_path / "in", n=1)
    make_text_as_jpg(folder / "notes.jpg")
    out = tmp_path / "out"
    _assert_one_error(_run(folder, "--out", out, "--skip-bad"), 1, "1 usable image",
                      "at least 2")
    _assert_nothing_left(out)


@pytest.mark.parametrize("kind", ["one image", "empty folder", "only non-images", "missing"])
def test_unusable_folders(kind, tmp_path):
    folder = tmp_path / "in"
    needle = {"one image": "at least 2", "empty folder": "no images in",
              "only non-images": "no images in", "missing": "folder not found"}[kind]
    if kind == "one image":
        _good(folder, n=1)
    elif kind != "missing":
        folder.mkdir()
    if kind == "only non-images":
        (folder / "readme.txt").write_text("hi")
        (folder / "data.csv").write_text("a,b\n1,2\n")
        (folder / "photo.jpg.bak").write_bytes(_photo(0).read_bytes())
    out = tmp_path / "out"
    _assert_one_error(_run(folder, "--out", out), 1, needle)
    _assert_nothing_left(out)


def test_output_path_is_a_file(tmp_path):
    folder = _good(tmp_path / "in")
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    _assert_one_error(_run(folder, "--out", out), 1, "not a folder")
    assert out.read_text() == "keep me"


def _unwritable_out(tmp_path: Path) -> Path:
    """A read-only folder; as root (CI), where mode bits do not stop writes, a path whose
    parent is a regular file, so creating it fails the same way an unwritable mount would."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        (ro / ".probe").write_bytes(b"")
    except OSError:
        return ro / "out"
    (ro / ".probe").unlink()
    os.chmod(ro, 0o755)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker / "out"


def test_read_only_output_folder(tmp_path):
    folder = _good(tmp_path / "in")
    out = _unwritable_out(tmp_path)
    try:
        _assert_one_error(_run(folder, "--out", out), 1, "cannot write to output folder")
    finally:
        os.chmod(tmp_path / "readonly", 0o755)
    assert not out.exists()


def test_each_bad_folder_gets_its_own_error_line(tmp_path):
    """Two bad folders: exit 1, one error line each; images are checked
    before any weights are needed, so this also runs where weights are absent."""
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "b" / "x.jpg").write_bytes(b"")
    (root / "a" / "x.jpg").write_text("not an image")
    out = tmp_path / "out"
    r = _run(root / "a", root / "b", "--out", out)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert len(_error_lines(r.output)) == 2  # one line per failed folder
    _assert_nothing_left(out)


@pytest.mark.parametrize("value", ["x", "0/4", "5/4", "1/0", "2", "1/2/3", "-1/2"])
def test_malformed_shard_is_a_usage_error(value, tmp_path):
    r = runner.invoke(app, ["run", str(_good(tmp_path / "in")), "--shard", value])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--shard" in r.output


def test_gt_json_that_does_not_parse(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text('{"images": [')
    pred = tmp_path / "pred.json"
    pred.write_text('{"images": [], "annotations": [], "categories": []}')
    _assert_one_error(runner.invoke(app, ["eval", "--gt", str(gt), "--pred", str(pred)]), 1,
                      "not valid JSON")


def _pred_for(names_sizes: list[tuple[str, int, int]]) -> dict:
    from pycocotools import mask as mask_utils

    images, anns = [], []
    for i, (name, h, w) in enumerate(names_sizes, start=1):
        m = np.zeros((h, w), np.uint8, order="F")
        m[h // 4: h // 2, w // 4: w // 2] = 1
        rle = mask_utils.encode(m)
        rle["counts"] = rle["counts"].decode()
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        anns.append({"id": i, "image_id": i, "category_id": 1, "segmentation": rle,
                     "score": 0.9, "area": int(m.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "bottle"}]}


def test_gt_whose_image_sizes_do_not_match(tmp_path):
    gt_images = json.loads(GT.read_text())["images"]
    first = gt_images[0]
    pred = tmp_path / "instances.json"
    pred.write_text(json.dumps(_pred_for([(first["file_name"], first["height"] + 1,
                                           first["width"])])))
    _assert_one_error(runner.invoke(app, ["eval", "--gt", str(GT), "--pred", str(pred)]), 1,
                      first["file_name"], "in the ground truth")


def test_gt_whose_image_names_do_not_match(tmp_path):
    """Documented: predictions on images the GT lacks are not scored (a warning names them)."""
    pred = tmp_path / "instances.json"
    pred.write_text(json.dumps(_pred_for([("other_1.jpg", 40, 50), ("other_2.jpg", 40, 50)])))
    r = runner.invoke(app, ["eval", "--gt", str(GT), "--pred", str(pred), "--json"])
    assert r.exit_code == 0 and "Traceback" not in r.output
    assert "warning:" in r.stderr and "other_1.jpg" in r.stderr
    assert json.loads(r.stdout)["per_category"]["bottle"]["n_pred"] == 0


def test_merge_refuses_a_clash(tmp_path):
    def result(root: Path, images: int) -> None:
        root.mkdir(parents=True)
        (root / "instances.json").write_text(json.dumps(
            {"images": [{"id": i + 1, "file_name": f"{i}.jpg", "height": 2, "width": 2}
                        for i in range(images)], "annotations": [],
             "categories": [{"id": 1, "name": "cat"}]}))
        (root / "manifest.json").write_text(manifest_text([f"{i}.jpg" for i in range(images)]))

    result(tmp_path / "s1" / "cat", 2)
    result(tmp_path / "s2" / "cat", 3)
    out = tmp_path / "merged"
    _assert_one_error(runner.invoke(app, ["merge", str(tmp_path / "s1"), str(tmp_path / "s2"),
                                          "--out", str(out)]), 1, "clashing", "--force")
    assert not out.exists()


# --------------------------------------------------------------------------- real processes


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COSEG_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "coseg_cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO,
                          check=False)


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    """The terminal sees what a user sees: one `error:` line on stderr, exit 1, stdout empty."""
    folder = _good(tmp_path / "in")
    make_text_as_jpg(folder / "notes.jpg")
    (tmp_path / "out.txt").write_text("")
    gt = tmp_path / "gt.json"
    gt.write_text("{")
    for args, needle in (((folder, "--out", tmp_path / "o", *TINY), "not a readable image"),
                         ((folder, "--out", tmp_path / "out.txt", *TINY), "not a folder")):
        p = _cli("run", *args)
        assert p.returncode == 1, p.stderr
        assert "Traceback" not in p.stderr + p.stdout and p.stdout == ""
        assert len(_error_lines(p.stderr)) == 1 and needle in p.stderr
    p = _cli("eval", "--gt", gt, "--pred", tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(_error_lines(p.stderr)) == 1 and "not valid JSON" in p.stderr


# --------------------------------------------------------------------------- correct results


# name in the folder → (maker, expected (height, width) after EXIF orientation)
ODD_BUT_GOOD = {
    "cmyk.jpg": (make_cmyk_jpeg, None),
    "grey 16-bit.png": (make_16bit_png, None),
    "palette transparent.png": (make_palette_png, None),
    "exif rotated.jpg": (make_exif_rotated, (EXIF_STORED_WH[0], EXIF_STORED_WH[1])),
    "one pixel.png": (make_1x1, (1, 1)),
    "strip 20000x100.jpg": (make_strip, (100, 20000)),
    "huge 12000x9000.jpg": (make_huge, (9000, 12000)),
    "ünïcødé ☃ name.jpg": (lambda p: shutil.copy(_photo(1), p), None),
}


@pytest.fixture(scope="module")
def odd_run(weights_ready, tmp_path_factory):
    """ONE tiny run over a folder (unicode + spaces in its name) mixing every odd-but-valid
    image with two ordinary photos."""
    folder = tmp_path_factory.mktemp("odd") / "bottles ü 🍾"
    _good(folder, n=2)
    for name, (make, _) in ODD_BUT_GOOD.items():
        make(folder / name)
    out = tmp_path_factory.mktemp("odd-out") / "out dir é"
    r = runner.invoke(app, ["run", str(folder), "--out", str(out), "--json", *TINY])
    return folder, out, r


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # our own checks
def test_odd_images_give_a_correct_result(odd_run):
    folder, out, r = odd_run
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and not _error_lines(r.output)
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["status"] == "ok" and line["images"] == 2 + len(ODD_BUT_GOOD)
    data = json.loads((out / "instances.json").read_text())
    assert data["categories"][0]["name"] == folder.name
    by_name = {im["file_name"]: im for im in data["images"]}
    assert set(by_name) == {p.name for p in folder.iterdir()}
    for name, (_, expected) in ODD_BUT_GOOD.items():
        im = by_name[name]
        if expected is None:
            with Image.open(folder / name) as src:
                expected = (src.height, src.width)
        assert (im["height"], im["width"]) == expected, name
        stem = Path(name).stem
        h, w = expected
        with Image.open(out / "labels" / f"{stem}.png") as labels:
            assert labels.size == (w, h), name
        with Image.open(out / "overlays" / f"{stem}.jpg") as overlay:
            assert overlay.size == (w, h) and overlay.mode == "RGB", name
        with Image.open(out / "cosaliency" / f"{stem}.png") as heat:
            assert heat.size == (w, h), name
        for mask_png in (out / "masks" / stem).glob("*.png"):
            with Image.open(mask_png) as m:
                assert m.size == (w, h), name
    for ann in data["annotations"]:
        im = next(i for i in data["images"] if i["id"] == ann["image_id"])
        assert ann["segmentation"]["size"] == [im["height"], im["width"]]
    assert not [p for p in out.rglob("*") if ".part" in p.name]
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("instances.json", "manifest.json"):  # not mkstemp's 0600: others may read
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["images"] == 2 + len(ODD_BUT_GOOD)


# --------------------------------------------------------------------------- malformed masks

H0, W0 = 422, 640  # size of the first image of examples/bottle-annotations.json
_VALID_COUNTS = "PhW8"  # an empty H0 x W0 mask, as pycocotools writes it
# name → (segmentation, text the error line must hold). Each is checked in every reader.
BAD_MASKS = {
    "RLE string that is not RLE (pycocotools spun >10 min)":
        ({"size": [H0, W0], "counts": "@@@@not-rle"}, "character 't' at position 6"),
    "RLE string decoding to negative runs":
        ({"size": [H0, W0], "counts": "@@@@"}, "negative run length (-16 at run 0)"),
    "RLE string whose runs do not sum to H·W":
        ({"size": [H0, W0], "counts": "0k0"}, "covers 27 pixels but the 422x640 image has 270080"),
    "RLE string with trailing garbage":
        ({"size": [H0, W0], "counts": _VALID_COUNTS + "`"}, "trailing garbage"),
    "RLE string with a 7-character run length":
        ({"size": [H0, W0], "counts": "oooooo0"}, "longer than 6 characters"),
    "RLE string with a NUL byte":
        ({"size": [H0, W0], "counts": "Ph\x00W8"}, "character '\\x00' at position 2"),
    "uncompressed RLE with a negative run":
        ({"size": [H0, W0], "counts": [-5, H0 * W0 + 5]}, "negative run length (-5 at run 0)"),
    "uncompressed RLE whose runs do not sum to H·W":
        ({"size": [H0, W0], "counts": [1, 2, 3]}, "covers 6 pixels"),
    "uncompressed RLE of non-integers":
        ({"size": [H0, W0], "counts": [0.5, "x"]}, "must be integers, got 0.5 at run 0"),
    "RLE size that is not the image's":
        ({"size": [H0 + 1, W0], "counts": [(H0 + 1) * W0]}, "mask is 423x640 (HxW) but the image"),
    "RLE size that is not two integers":
        ({"size": "big", "counts": _VALID_COUNTS}, "'size' must be [height, width] integers"),
    "RLE without counts": ({"size": [H0, W0]}, "needs 'size' and 'counts'"),
    "polygon of 2 points": ([[10, 10, 50, 50]], "polygon 0 has 2 point(s)"),
    "polygon of an odd count": ([[10, 10, 50, 50, 10]], "odd number of coordinates (5)"),
    "polygon with NaN": ([[10, 10, 50, float("nan"), 10, 50]], "coordinate 3 is not finite"),
    "polygon with a string": ([[10, 10, "50", 50, 10, 50]], "coordinate 2 is not a number"),
    "polygon far outside the image": ([[10, 10, 1e12, 10, 10, 50]], "far outside"),
    "segmentation that is a number": (42, "must be a list of polygons or an RLE"),
}


def _pred_with(seg) -> dict:
    """Predictions for the GT's first image holding one annotation with segmentation `seg`."""
    first = json.loads(GT.read_text())["images"][0]
    assert (first["height"], first["width"]) == (H0, W0)
    return {"images": [{"id": 1, "file_name": first["file_name"], "height": H0, "width": W0}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": seg,
                             "score": 0.9, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "bottle"}]}


def _mask_reader_cli(reader: str, seg, tmp_path: Path) -> tuple[list[str], Path]:
    """Arguments running `reader` on a file holding `seg` as its first annotation, and that
    file."""
    if reader == "eval --gt":
        gt = json.loads(GT.read_text())
        gt["annotations"][0]["segmentation"] = seg
        path = tmp_path / "annotations.json"
        path.write_text(json.dumps(gt))
        pred = tmp_path / "pred.json"
        pred.write_text(json.dumps(_pred_with({"size": [H0, W0], "counts": _VALID_COUNTS})))
        return ["eval", "--gt", str(path), "--pred", str(pred)], path
    run_out = tmp_path / "run"
    run_out.mkdir()
    path = run_out / "instances.json"
    path.write_text(json.dumps(_pred_with(seg)))
    (run_out / "manifest.json").write_text("{}")
    if reader == "eval --pred":
        return ["eval", "--gt", str(GT), "--pred", str(run_out)], path
    if reader == "merge":
        return ["merge", str(run_out), "--out", str(tmp_path / "merged")], path
    return ["report", str(run_out)], path


def test_valid_counts_constant_is_an_empty_mask():
    from coseg_cli.coco import decode, encode_masks

    assert encode_masks(np.zeros((1, H0, W0), bool))[0]["counts"] == _VALID_COUNTS
    assert not decode(encode_masks(np.zeros((1, H0, W0), bool))[0]).any()


@pytest.mark.parametrize("reader", ["eval --gt", "eval --pred", "merge", "report"])
@pytest.mark.parametrize("kind", list(BAD_MASKS))
def test_malformed_mask_is_one_line_in_every_reader(kind, reader, tmp_path):
    """Every reader validates with the same function before pycocotools sees the mask: one line
    naming the file, the annotation index and the image, at once."""
    seg, needle = BAD_MASKS[kind]
    args, path = _mask_reader_cli(reader, seg, tmp_path)
    t0 = time.perf_counter()
    r = runner.invoke(app, args)
    seconds = time.perf_counter() - t0
    line = _assert_one_error(r, 1, str(path), "annotations[0]", "000000000790.jpg", needle)
    assert seconds < 1.0, (seconds, line)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "run" / "report.html").exists()


def test_image_size_in_a_coco_file_is_checked(tmp_path):
    """Height/width that are not positive integers, or too large to hold, are one line too."""
    for value, needle in ((float("inf"), "needs integer 'height'"), ("422", "needs integer"),
                          (0, "is not positive"), (10 ** 6, "larger than 250000000 pixels")):
        pred = _pred_with([[10, 10, 50, 10, 10, 50]])
        pred["images"][0]["height"] = value
        run_out = tmp_path / f"run-{value}"
        run_out.mkdir()
        (run_out / "instances.json").write_text(json.dumps(pred))
        (run_out / "manifest.json").write_text("{}")
        _assert_one_error(runner.invoke(app, ["report", str(run_out)]), 1, "image 000000000790",
                          needle)


def test_malformed_rle_in_a_real_process_exits_at_once(tmp_path):
    """The reported hang: pycocotools' C decoder spun >10 minutes on this input, deaf to
    SIGTERM. Now a real `coseg eval` answers with one line well within the `timeout 20`."""
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(_pred_with({"size": [H0, W0], "counts": "@@@@not-rle"})))
    t0 = time.perf_counter()
    p = _cli("eval", "--gt", GT, "--pred", pred)
    assert time.perf_counter() - t0 < 20
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stdout == ""
    lines = _error_lines(p.stderr)
    assert len(lines) == 1 and "pred.json: annotations[0] (id 1) of image 000000000790.jpg: " \
        "compressed RLE 'counts' is malformed" in lines[0], p.stderr


@pytest.fixture(scope="module")
def big_run_output(tmp_path_factory) -> Path:
    """A valid run output large enough to keep eval/merge/report busy for seconds: 20,000
    noisy 40x40 masks (long RLE strings) in one instances.json (~16 MB)."""
    from coseg_cli.coco import encode_masks

    out = tmp_path_factory.mktemp("big") / "run"
    out.mkdir()
    noise = np.random.default_rng(0).random((1, 40, 40)) < 0.5
    seg = encode_masks(noise)[0]
    per_image, n_images = 20, 1000
    images = [{"id": i + 1, "file_name": f"{i}.jpg", "height": 40, "width": 40}
              for i in range(n_images)]
    anns = [{"id": j + 1, "image_id": j // per_image + 1, "category_id": 1, "segmentation": seg,
             "score": 0.5, "iscrowd": 0} for j in range(n_images * per_image)]
    (out / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    (out / "manifest.json").write_text(manifest_text([im["file_name"] for im in images],
                                                     instances_per_image=[per_image] * n_images))
    return out


def _handles_sigterm(pid: int) -> bool:
    """Whether the process has installed its SIGTERM handler (cli.main does, before any work)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (int(signal.SIGTERM) - 1)))


def _bytes_read(pid: int) -> int:
    return int(next(ln for ln in Path(f"/proc/{pid}/io").read_text().splitlines()
                    if ln.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["eval", "merge", "report"])
def test_sigterm_mid_read_stops_within_two_seconds(command, big_run_output, tmp_path):
    """eval/merge/report honour SIGTERM while validating and scoring masks: exit 143 with one
    line within 2 s (no C call on a mask runs long: every mask is validated first)."""
    args = {"eval": ["eval", "--gt", big_run_output / "instances.json", "--pred",
                     big_run_output],
            "merge": ["merge", big_run_output, "--out", tmp_path / "merged"],
            "report": ["report", big_run_output]}[command]
    size = (big_run_output / "instances.json").stat().st_size
    env = {**os.environ, "COSEG_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "coseg_cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not (
                _handles_sigterm(proc.pid) and _bytes_read(proc.pid) >= size):
            time.sleep(0.005)  # the handler is set and instances.json was read: work is under way
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr
    assert seconds < 2.0, seconds
    lines = _error_lines(stderr)
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert "interrupted (SIGTERM); no half-written file is left" in lines[0]
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())
    assert not (big_run_output / "report.html").exists()
    assert not [p for p in big_run_output.parent.rglob("*") if ".part" in p.name]


# --------------------------------------------------------------------------- two runs, one OUT


def _fake_cosegment_into(records, cfg, sink, **kw):
    """The stage math is tested elsewhere: one square instance on the first image, sent to the
    sink as the real pipeline sends it."""
    from coseg_cli.records import Instance, RunResult

    h, w = records[0].shape
    mask = np.zeros((h, w), bool)
    mask[h // 4: h // 2, w // 4: w // 2] = True
    return RunResult(images=records, instances=[Instance(0, mask, 0.9, (w // 3, h // 3), 1)],
                     cosaliency=[np.full(r.shape, 0.5, np.float32) for r in records],
                     config={"seed": 0, "preset": "fast"}, environment={}, timings={},
                     category=kw.get("category") or "object").send_to(sink)


@pytest.fixture
def fast_pipeline(monkeypatch):
    from coseg_cli import pipeline

    monkeypatch.setattr(pipeline, "cosegment_into", _fake_cosegment_into)


def _write_lock(out: Path, pid: int, host: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".coseg.lock"
    lock.write_text(json.dumps({"pid": pid, "host": host, "token": "other",
                                "started": "2026-01-01T00:00:00+00:00"}))
    return lock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_run_into_the_same_out_is_refused(weights_ready, tmp_path):
    """Two real `coseg run` processes into one OUT: the second exits 1 at once naming the first
    one's pid and host; SIGTERM to the first removes its lock (exit 143)."""
    folder = _good(tmp_path / "in", n=3)
    out = tmp_path / "out"
    env = {**os.environ, "COSEG_OFFLINE": "1", "COLUMNS": "200"}
    first = subprocess.Popen([sys.executable, "-m", "coseg_cli", "run", str(folder), "--out",
                              str(out), *TINY, "--epochs", "200"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while first.poll() is None and not (out / ".coseg.lock").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        second = _cli("run", folder, "--out", out, *TINY)
        assert time.monotonic() - t0 < 30  # interpreter + torch start-up; no work is done
        assert first.poll() is None, first.communicate()  # still working: it held the lock
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        lines = _error_lines(second.stderr)
        assert len(lines) == 1, second.stderr
        assert f"is in use by another coseg run (pid {first.pid} on host " \
               f"{socket.gethostname()}" in lines[0]
        assert (out / ".coseg.lock").exists()  # the refused run did not touch the lock
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 143, stderr
    assert not (out / ".coseg.lock").exists()
    _assert_nothing_left(out)


def test_merge_into_an_out_in_use_is_refused(fast_pipeline, tmp_path):
    """`coseg merge` holds OUT's lock too: while a live process holds it, the merge exits 1 with
    one line naming that process, writes nothing, and leaves the lock alone."""
    src = tmp_path / "run"
    assert _run(_good(tmp_path / "in"), "--out", src).exit_code == 0
    merged = tmp_path / "merged"
    lock_file = _write_lock(merged, os.getppid(), socket.gethostname())  # alive, not us
    r = runner.invoke(app, ["merge", str(src), "--out", str(merged)])
    _assert_one_error(r, 1, f"{merged} is in use by another coseg run (pid {os.getppid()}")
    assert sorted(p.name for p in merged.iterdir()) == [".coseg.lock"]
    assert lock_file.exists()
    lock_file.unlink()
    r = runner.invoke(app, ["merge", str(src), "--out", str(merged)])
    assert r.exit_code == 0, r.output
    assert (merged / "index.json").is_file() and not lock_file.exists()


def test_stale_lock_of_a_dead_process_is_taken_over(fast_pipeline, tmp_path):
    folder = _good(tmp_path / "in")
    out = tmp_path / "out"
    _write_lock(out, _dead_pid(), socket.gethostname())
    r = _run(folder, "--out", out)
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json").is_file() and not (out / ".coseg.lock").exists()
    assert not list(out.glob(".coseg.lock*"))  # no renamed stale copy left either


def test_lock_of_a_live_run_or_another_host_is_respected(fast_pipeline, tmp_path):
    """A live pid on this host (our parent) or any pid on another host: exit 1, lock kept,
    nothing written; the message says how to clear a lock whose run is gone."""
    folder = _good(tmp_path / "in")
    for pid, host in ((os.getppid(), None), (_dead_pid(), "elsewhere.example")):
        out = tmp_path / f"out-{pid}"
        lock = _write_lock(out, pid, host or socket.gethostname())
        before = lock.read_bytes()
        line = _assert_one_error(_run(folder, "--out", out), 1, f"pid {pid} on host "
                                 f"{host or socket.gethostname()}", f"delete {lock}")
        assert "started 2026-01-01" in line
        assert lock.read_bytes() == before and sorted(out.iterdir()) == [lock]


def test_unreadable_lock_is_respected_while_fresh_and_taken_over_when_old(fast_pipeline,
                                                                          tmp_path):
    """A lock without an owner record is a run between creating and writing it; after 10 s it
    can only be a crash's leftover."""
    folder = _good(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".coseg.lock"
    lock.write_bytes(b"")
    _assert_one_error(_run(folder, "--out", out), 1, "names no owner")
    os.utime(lock, (0, 0))
    r = _run(folder, "--out", out)
    assert r.exit_code == 0, r.output
    assert not lock.exists()


def test_lock_is_removed_after_success_and_after_an_error(fast_pipeline, tmp_path):
    folder = _good(tmp_path / "in")
    out = tmp_path / "out"
    assert _run(folder, "--out", out).exit_code == 0
    assert not (out / ".coseg.lock").exists()
    make_text_as_jpg(folder / "notes.jpg")
    out2 = tmp_path / "out2"
    _assert_one_error(_run(folder, "--out", out2), 1, "not a readable image")
    assert not out2.exists()  # the lock made OUT; nothing else was written: both removed


def test_shards_into_one_out_lock_only_their_own_folders(fast_pipeline, tmp_path):
    """`--shard` runs share OUT by design: a lock is per output folder, so a held OUT/b does not
    stop the shard that writes OUT/a."""
    a, b = _good(tmp_path / "a"), _good(tmp_path / "b")
    out = tmp_path / "out"
    _write_lock(out / "b", os.getppid(), socket.gethostname())
    from coseg_cli.batch import shard_indices

    shard = 1 if shard_indices([a, b], 1, 2) == [0] else 2
    r = _run(a, b, "--out", out, "--shard", f"{shard}/2")
    assert r.exit_code == 0, r.output
    assert (out / "a" / "manifest.json").is_file() and not (out / "a" / ".coseg.lock").exists()
    _assert_one_error(_run(a, b, "--out", out), 1, f"{out / 'b'} is in use")
    assert not (out / "a" / ".coseg.lock").exists()  # all or none: a's lock was given back


# --------------------------------------------------------------------------- disk trouble


def _fill_disk_at(monkeypatch, kind: str) -> None:
    """Make one write of `kind` fail as a full disk does: a partial file, then ENOSPC."""
    from pathlib import Path as _Path

    def full(path) -> None:
        with open(path, "wb") as fh:
            fh.write(b"\x89PNG\r\n half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if kind in ("mask PNG", "overlay JPEG"):
        real_save = Image.Image.save
        suffix = ".png" if kind == "mask PNG" else ".jpg"

        def save(self, fp, *args, **kwargs):
            if isinstance(fp, (str, _Path)) and str(fp).endswith(suffix) and (
                    kind == "overlay JPEG" or "masks" in _Path(fp).parts[-3:-1]
                    or _Path(fp).parent.name.endswith(".part")):
                full(fp)
            return real_save(self, fp, *args, **kwargs)

        monkeypatch.setattr(Image.Image, "save", save)
    else:  # a JSON or HTML output, written by runtime.atomic_write_bytes
        real_write = _Path.write_bytes
        name = {"instances.json": ".instances.json.", "report.html": ".report.html."}[kind]

        def write_bytes(self, data):
            if self.name.startswith(name):
                full(self)
            return real_write(self, data)

        monkeypatch.setattr(_Path, "write_bytes", write_bytes)


def _complete_files(out: Path) -> None:
    """No temp file, and every image in OUT decodes in full (no half-written file)."""
    assert not [p for p in out.rglob("*") if ".part" in p.name or p.name.endswith(".old")]
    for p in out.rglob("*"):
        if p.suffix in (".png", ".jpg"):
            with Image.open(p) as im:
                im.load()
        elif p.suffix == ".json":
            json.loads(p.read_text())


@pytest.mark.parametrize("kind", ["mask PNG", "overlay JPEG", "instances.json", "report.html"])
def test_disk_full_mid_export_then_rerun(kind, fast_pipeline, tmp_path):
    """ENOSPC while writing outputs: one line naming the file, exit 1, no half-written file and
    no manifest (the folder reads as incomplete); after space is freed, a re-run completes."""
    folder = _good(tmp_path / "in", n=3)
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        _fill_disk_at(mp, kind)
        r = _run(folder, "--out", out)
    line = _assert_one_error(r, 1, str(folder), f"cannot write {out}", "No space left on device")
    _complete_files(out)
    if kind != "report.html":  # the report is written after the manifest that completes a run
        assert not (out / "manifest.json").exists(), line
    assert not (out / ".coseg.lock").exists()
    r = _run(folder, "--out", out)
    assert r.exit_code == 0, r.output
    _complete_files(out)
    assert (out / "manifest.json").is_file() and (out / "report.html").is_file()
    assert len(json.loads((out / "instances.json").read_text())["images"]) == 3


def test_unwritable_cache_then_rerun(weights_ready, tmp_path):
    """OUT/cache cannot be created (a file is in its place; as root, mode bits would not stop
    us): the first stage-cache write fails with one line; once fixed, the run completes."""
    folder = _good(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "cache").write_text("not a folder")
    _assert_one_error(_run(folder, "--out", out), 1, f"cannot write {out / 'cache'}",
                      "Not a directory")
    _complete_files(out)
    assert not (out / "manifest.json").exists() and not (out / ".coseg.lock").exists()
    (out / "cache").unlink()
    r = _run(folder, "--out", out)
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json").is_file() and (out / "cache").is_dir()


def test_disk_full_writing_the_finetuned_weights_then_rerun(weights_ready, tmp_path,
                                                           monkeypatch):
    """ENOSPC while the fine-tuned weights go into OUT/cache/model (torch.save alone reports it as
    a RuntimeError with a C++ trace): one line naming the file, no temp file, and a re-run
    completes."""
    folder = _good(tmp_path / "in")
    out = tmp_path / "out"
    real_write = Path.write_bytes

    def write_bytes(self, data):
        if self.name.endswith(".part.pt"):
            real_write(self, data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "write_bytes", write_bytes)
        r = _run(folder, "--out", out)
    _assert_one_error(r, 1, f"cannot write {out / 'cache' / 'model'}", "No space left on device")
    assert not list((out / "cache" / "model").glob("*"))  # neither the entry nor its temp file
    assert not (out / "manifest.json").exists() and not (out / ".coseg.lock").exists()
    r = _run(folder, "--out", out)
    assert r.exit_code == 0, r.output
    assert len(list((out / "cache" / "model").glob("*.pt"))) == 1


def test_disk_full_in_merge_and_saliency(tmp_path, monkeypatch):
    """The other writers use the same atomic write: ENOSPC is one line there too."""
    folder = _good(tmp_path / "in")
    real_write = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(".index.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    src = tmp_path / "run"
    src.mkdir()
    pred = _pred_with([[10, 10, 50, 10, 10, 50]])
    (src / "instances.json").write_text(json.dumps(pred))
    (src / "manifest.json").write_text(manifest_text([pred["images"][0]["file_name"]]))
    merged = tmp_path / "merged"
    _assert_one_error(runner.invoke(app, ["merge", str(src), "--out", str(merged)]), 1,
                      f"cannot write {merged / 'index.json'}: No space left on device")
    assert not [p for p in merged.rglob("*") if ".part" in p.name]

    def save(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "priors"
    _assert_one_error(runner.invoke(app, ["saliency", str(folder), "--out", str(out),
                                          "--method", "spectral_residual"]), 1,
                      f"cannot write {out}", "No space left on device")
    assert not [p for p in out.rglob("*") if ".part" in p.name]


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("config", "x", "config must be a JSON object, got 'x'"),
    ("config", {"noise_percentile": "x"},
     "config: noise_percentile must be a finite number >= 0, got 'x'"),
    ("config", {"noise_percentile": 150}, "config: noise_percentile must be in [0, 100)"),
    ("counts", [1], "counts must be a JSON object, got [1]"),
    ("environment", 5, "environment must be an object of strings"),
    ("timings_s", [1], "timings_s must be an object of seconds"),
    ("train", 3, "train must be a JSON object, got 3"),
    ("weights", "x", "weights must be a JSON object, got 'x'"),
    ("skipped_files", 5, "skipped_files must be a list of strings, got 5"),
    ("prior_trained", [], "prior_trained must be true or false, got []"),
    ("started_at", "soon", "started_at must be an ISO 8601 time with a timezone, got 'soon'"),
    ("seed", 7, "seed 7 disagrees with config.seed 0"),
    ("extra", 1, "unknown key(s) ['extra']"),
])
def test_report_of_a_manifest_with_odd_fields(key, value, needle, tmp_path):
    """Found by tests/test_fuzz.py: sections of the wrong type made `coseg report` crash with
    AttributeError/TypeError. The manifest is read through coseg_cli.manifest: each field of the
    wrong type or range is one error line naming the file and the key, and no page is written."""
    run_out = tmp_path / "run"
    run_out.mkdir()
    pred = _pred_with([[10, 10, 50, 10, 10, 50]])
    (run_out / "instances.json").write_text(json.dumps(pred))
    good = json.loads(manifest_text([pred["images"][0]["file_name"]], instances_per_image=[1]))
    (run_out / "manifest.json").write_text(json.dumps(good))
    assert runner.invoke(app, ["report", str(run_out)]).exit_code == 0
    (run_out / "report.html").unlink()
    (run_out / "manifest.json").write_text(json.dumps({**good, key: value}))
    _assert_one_error(runner.invoke(app, ["report", str(run_out)]), 1,
                      f"{run_out / 'manifest.json'}: ", needle)
    assert not (run_out / "report.html").exists()


# --------------------------------------------------------------------------- photos read twice


def test_photo_changed_during_run_is_one_line_error(monkeypatch, tmp_path):
    """`coseg run` holds each photo's working copy only (issue 13: flat memory) and reads the
    photo again for its overlay: a photo replaced meanwhile is one error line, not an overlay
    of other pixels, and the folder gets no manifest."""
    from coseg_cli import pipeline

    folder = _good(tmp_path / "in")
    seen = []

    def replacing(records, cfg, sink, **kw):
        seen.extend(records)
        first = folder / records[0].name
        first.write_bytes(_jpeg_bytes(Image.new("RGB", records[0].shape[::-1], "red")))
        return _fake_cosegment_into(records, cfg, sink, **kw)

    monkeypatch.setattr(pipeline, "cosegment_into", replacing)
    out = tmp_path / "out"
    r = _run(folder, "--out", out)
    _assert_one_error(r, 1, seen[0].name, "file changed on disk during the run")
    assert all(rec.image is None and max(rec.work.shape[:2]) <= 96 for rec in seen)
    assert not (out / "manifest.json").exists()

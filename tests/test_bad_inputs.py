"""A corpus of bad and odd inputs, generated here: each gets one `error:` line with its documented
exit code and no traceback (and nothing left behind in OUT), or a correct result.

Exit codes: 0 success; 1 a CosegError (bad input, unwritable output, failed folder); 2 a usage
error (bad option value, missing argument); 130 interrupted (tests/test_interrupt.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
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
        (root / "manifest.json").write_text("{}")

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

"""Image loading on files the tests generate: every mode, EXIF, corrupt input, grouping rules."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coseg_cli.errors import InputError
from coseg_cli.images import (
    decode_image,
    list_images,
    load_folder,
    pixels,
    shrink_to,
    working_copy,
)


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _gradient(w: int = 40, h: int = 30) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return np.stack([x, y, 255 - x], axis=2).astype(np.uint8)


def test_rgb_png_roundtrip_exact():
    arr = _gradient()
    out = decode_image(_png(Image.fromarray(arr)))
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out, arr)


def test_grayscale_becomes_three_equal_channels():
    g = _gradient()[:, :, 0]
    out = decode_image(_png(Image.fromarray(g, mode="L")))
    assert out.shape == (30, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)


def test_sixteen_bit_keeps_full_range():
    g16 = (np.linspace(0, 65535, 40)[None, :].repeat(30, 0)).astype(np.uint16)
    out = decode_image(_png(Image.fromarray(g16)))
    assert out.shape == (30, 40, 3)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    # a 16-bit mid-grey must not be clipped to white (naive convert("RGB") clips)
    assert 100 < out[0, 20, 0] < 160


def test_palette_with_transparency_composited_over_white():
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    pal.paste(1, (0, 0, 5, 10))
    data = _png(pal, transparency=0)
    out = decode_image(data)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 9], [255, 255, 255])  # transparent → white


def test_rgba_alpha_composited():
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 2] = 255
    arr[:, :4, 3] = 255  # left half opaque blue, right half transparent
    out = decode_image(_png(Image.fromarray(arr, mode="RGBA")))
    np.testing.assert_array_equal(out[0, 0], [0, 0, 255])
    np.testing.assert_array_equal(out[0, 7], [255, 255, 255])


def test_cmyk_jpeg_converted_to_rgb():
    red = Image.new("RGB", (16, 16), (220, 20, 20)).convert("CMYK")
    out = decode_image(_jpeg(red))
    assert out.shape == (16, 16, 3)
    r, g, b = out[8, 8].astype(int)
    assert r > 180 and g < 70 and b < 70, (r, g, b)


def test_exif_orientation_applied():
    arr = np.zeros((20, 60, 3), np.uint8)  # wide image, bright stripe on the left
    arr[:, :10] = 255
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW for display
    out = decode_image(_jpeg(img, exif=exif.tobytes()))
    assert out.shape == (60, 20, 3)  # now tall
    assert out[:10, :, 0].mean() > 200  # the left stripe is on top after a CW rotation


@pytest.mark.parametrize("data, word", [
    (b"", "empty"),
    (b"hello, I am a text file", "not a readable image"),
])
def test_unreadable_bytes(data, word):
    with pytest.raises(InputError, match=word):
        decode_image(data, "x.jpg")


def test_truncated_jpeg_is_an_error():
    data = _jpeg(Image.fromarray(_gradient(200, 200)))
    with pytest.raises(InputError, match="x.jpg"):
        decode_image(data[: len(data) // 2], "x.jpg")


def _write(folder: Path, name: str, data: bytes) -> Path:
    p = folder / name
    p.write_bytes(data)
    return p


def test_list_images_filters_and_sorts(tmp_path):
    good = _png(Image.fromarray(_gradient()))
    for name in ["b.PNG", "a.jpg", ".hidden.png", "notes.txt", "c.TiFf", "d.webp"]:
        _write(tmp_path, name, good)
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub", "e.png", good)
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.TiFf", "d.webp"]


def test_load_folder_collects_all_bad_files(tmp_path):
    good = _png(Image.fromarray(_gradient()))
    _write(tmp_path, "a.png", good)
    _write(tmp_path, "b.png", good)
    _write(tmp_path, "zero.jpg", b"")
    _write(tmp_path, "text.jpg", b"not an image at all")
    with pytest.raises(InputError) as info:
        load_folder(tmp_path)
    msg = str(info.value)
    assert "zero.jpg" in msg and "text.jpg" in msg and "--skip-bad" in msg
    records, skipped = load_folder(tmp_path, skip_bad=True)
    assert [r.name for r in records] == ["a.png", "b.png"]
    assert len(skipped) == 2


@pytest.mark.parametrize("n_good", [0, 1])
def test_fewer_than_two_images_is_an_error(tmp_path, n_good):
    for i in range(n_good):
        _write(tmp_path, f"{i}.png", _png(Image.fromarray(_gradient())))
    with pytest.raises(InputError, match="no images|at least 2"):
        load_folder(tmp_path)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_folder(tmp_path / "nope")
    f = _write(tmp_path, "f.png", b"x")
    with pytest.raises(InputError, match="not a folder"):
        load_folder(f)


def test_records_carry_hash_and_relative_name(tmp_path):
    data = _png(Image.fromarray(_gradient()))
    _write(tmp_path, "one image.png", data)
    _write(tmp_path, "ünï.png", data)
    records, _ = load_folder(tmp_path)
    assert {r.name for r in records} == {"one image.png", "ünï.png"}
    assert records[0].sha1 == records[1].sha1 and len(records[0].sha1) == 40
    assert records[0].stem == "one image"


def _photo_folder(folder: Path) -> list[np.ndarray]:
    """Two 600x400 gradient JPEGs (one with EXIF rotation) and one 80x60 PNG; returns the arrays
    load_folder decodes (full resolution, EXIF applied)."""
    big = np.asarray(Image.fromarray(_gradient(60, 40)).resize((600, 400)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW for display: decoded 400x600 tall
    _write(folder, "a.jpg", _jpeg(Image.fromarray(big)))
    _write(folder, "b.jpg", _jpeg(Image.fromarray(big[:, ::-1]), exif=exif.tobytes()))
    _write(folder, "c.png", _png(Image.fromarray(_gradient(80, 60))))
    return [r.image for r in load_folder(folder)[0]]


def test_work_max_side_records_hold_no_full_resolution_pixels(tmp_path):
    # issue 13: `coseg run` holds each photo's working copy and shape, not its pixels
    full = _photo_folder(tmp_path)
    records, _ = load_folder(tmp_path, work_max_side=96)
    assert [r.shape for r in records] == [(400, 600), (600, 400), (60, 80)]
    assert [(r.height, r.width) for r in records] == [(400, 600), (600, 400), (60, 80)]
    assert records[0].image is None and records[1].image is None
    assert records[2].image is records[2].work  # within 96 px: its own working copy
    for rec, arr in zip(records, full):
        assert max(rec.work.shape[:2]) <= 96
        np.testing.assert_array_equal(rec.work, shrink_to(arr, 96))
        np.testing.assert_array_equal(pixels(rec), arr)  # decoded again, EXIF applied
        assert working_copy(rec, 96) is rec.work
        np.testing.assert_array_equal(working_copy(rec, 50), shrink_to(arr, 50))


def test_pixels_of_a_file_changed_or_gone_since_loading(tmp_path):
    _photo_folder(tmp_path)
    records, _ = load_folder(tmp_path, work_max_side=96)
    _write(tmp_path, "a.jpg", _jpeg(Image.fromarray(_gradient(600, 400))))
    with pytest.raises(InputError, match=r"a\.jpg: file changed on disk during the run"):
        pixels(records[0])
    with pytest.raises(InputError, match=r"a\.jpg: file changed on disk"):
        working_copy(records[0], 50)
    (tmp_path / "b.jpg").unlink()
    with pytest.raises(InputError, match=r"b\.jpg: cannot read"):
        pixels(records[1])

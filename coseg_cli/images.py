"""Find and load input images: every supported file becomes RGB uint8 with EXIF orientation
applied; unreadable files are collected and reported together."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CosegError, InputError
from .records import ImageRecord

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Pillow's decompression-bomb guard, raised to what a 24 GB laptop can still hold as RGB.
MAX_PIXELS = 250_000_000


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (suffix in any case, hidden files skipped), sorted by name.

    Raises:
        InputError: the folder does not exist or is not a directory.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    return sorted(
        (p for p in folder.iterdir()
         if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.name,
    )


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode image bytes to uint8[H,W,3] RGB, EXIF orientation applied.

    Grayscale, palette, CMYK, 16-bit and float images are converted; alpha is composited over
    white (transparent regions read as background, as a viewer shows them).

    Raises:
        InputError: empty, truncated, corrupt, non-image or too large.
    """
    if not data:
        raise InputError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow's own guard (89 Mpx warning, 179 Mpx error) would reject a 108 Mpx photo
            # as "not a readable image": MAX_PIXELS below is the limit that applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Pillow warns about damaged metadata (corrupt EXIF) of images it still decodes:
            # Python warning lines on the terminal would only confuse; the pixels are what count
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with _pillow_pixel_limit(MAX_PIXELS), Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise InputError(f"{name}: {w}x{h} image is larger than {MAX_PIXELS} pixels")
                img.load()
                ImageOps.exif_transpose(img, in_place=True)  # no full copy when upright
                return _to_rgb8(img)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{name}: image is larger than {MAX_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not a readable image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{name}: corrupt or truncated image ({exc})") from None


@contextmanager
def _pillow_pixel_limit(limit: int) -> Iterator[None]:
    """Raise Pillow's decompression-bomb limit to at least `limit` while opening one image."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None if saved is None else max(saved, limit)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _to_rgb8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        # 16-bit data keeps its full range: 65535 → 255
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if np.nanmax(arr) <= 1.0 else arr
        arr = np.clip(np.nan_to_num(np.round(arr)), 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return _rgb_array(img)


def _rgb_array(img: Image.Image) -> np.ndarray:
    """uint8[H,W,3] copy of `img` converted to RGB band by band of rows: converting a 108 Mpx
    photo whole would briefly hold two more full-size copies (convert, then tobytes)."""
    w, h = img.size
    rgb = np.empty((h, w, 3), np.uint8)
    rows = max(1, (1 << 22) // max(1, w))
    for y0 in range(0, h, rows):
        band = img.crop((0, y0, w, min(h, y0 + rows)))
        rgb[y0:y0 + band.height] = np.asarray(band if band.mode == "RGB" else band.convert("RGB"),
                                              dtype=np.uint8)
    return rgb


def load_image(path: Path, root: Path | None = None, work_max_side: int | None = None
               ) -> ImageRecord:
    """Read one file into an ImageRecord (name relative to `root`, else the file name).

    With `work_max_side`, the record holds the working copy (`shrink_to`) and the image's shape
    instead of the full-resolution pixels, which `pixels` decodes again when needed: a folder of
    12 Mpx photos then holds ~0.9 MB per photo (at 640) instead of 36 MB. A photo already within
    `work_max_side` is held whole (it is its own working copy).
    """
    path = Path(path)
    data = _read(path)
    name = path.relative_to(root).as_posix() if root is not None else path.name
    image = decode_image(data, name)
    sha1 = hashlib.sha1(data).hexdigest()
    if work_max_side is None:
        return ImageRecord(path=path, name=name, image=image, sha1=sha1)
    work = shrink_to(image, work_max_side)
    return ImageRecord(path=path, name=name, image=image if work is image else None, sha1=sha1,
                       shape=(image.shape[0], image.shape[1]), work=work,
                       work_max_side=work_max_side)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def pixels(rec: ImageRecord) -> np.ndarray:
    """uint8[H,W,3] full-resolution RGB of `rec`: the array it holds, else its file decoded
    again (as `load_image` did).

    Raises:
        InputError: the file is gone, unreadable, or no longer the bytes that were loaded
            (checked by SHA-1), so outputs would not match the run's masks.
    """
    if rec.image is not None:
        return rec.image
    data = _read(rec.path)
    if hashlib.sha1(data).hexdigest() != rec.sha1:
        raise InputError(f"{rec.path}: file changed on disk during the run (SHA-1 differs from "
                         f"when it was loaded); run again on the final files")
    return decode_image(data, rec.name)


def working_copy(rec: ImageRecord, max_side: int) -> np.ndarray:
    """uint8[h,w,3] `rec` shrunk to longer side ≤ max_side: the held working copy when it was
    made for this max_side, else `shrink_to(pixels(rec), max_side)` (the same array)."""
    if rec.work is not None and rec.work_max_side == max_side:
        return rec.work
    return shrink_to(pixels(rec), max_side)


def load_folder(folder: Path, *, skip_bad: bool = False, min_images: int = 2,
                work_max_side: int | None = None) -> tuple[list[ImageRecord], list[str]]:
    """Load every image of a folder.

    Args:
        work_max_side: when given, each record holds its working copy and shape instead of the
            full-resolution pixels (see `load_image`); `pixels` reads them again.

    Returns:
        (records sorted by name, messages for files skipped because `skip_bad` was set).

    Raises:
        InputError: missing folder; unreadable files (all named at once) unless `skip_bad`;
            fewer than `min_images` usable images (co-segmentation needs a group).
    """
    folder = Path(folder)
    paths = list_images(folder)
    if not paths:
        raise InputError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    records: list[ImageRecord] = []
    bad: list[str] = []
    for p in paths:
        try:
            records.append(load_image(p, folder, work_max_side))
        except InputError as exc:
            bad.append(str(exc))
    if bad and not skip_bad:
        raise InputError(f"{len(bad)} unreadable file(s) in {folder} (use --skip-bad to continue "
                         f"without them): " + "; ".join(bad))
    if len(records) < min_images:
        raise InputError(f"{folder}: {len(records)} usable image(s); co-segmentation needs at "
                         f"least {min_images} images of one category")
    return records, bad


def as_rgb3(image: np.ndarray, error: type[CosegError] = InputError, what: str = "image"
            ) -> np.ndarray:
    """uint8[H,W] / [H,W,1] / [H,W,4] / [H,W,3] → contiguous [H,W,3] (grey repeated, alpha
    dropped); any other shape raises `error`. The dtype is left to the caller."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise error(f"{what} must be of shape (H,W,3), got {arr.shape}")
    return np.ascontiguousarray(arr)


def shrink_to(image: np.ndarray, max_side: int, min_side: int = 1) -> np.ndarray:
    """`image` shrunk (area interpolation) so its longer side is ≤ max_side, each side kept
    ≥ min_side; never enlarged."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return image
    size = (max(min_side, round(w * scale)), max(min_side, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def resize_map(values: np.ndarray, shape: tuple[int, int], interp: int = cv2.INTER_CUBIC
               ) -> np.ndarray:
    """float32[...,H,W] maps resized to `shape` (h, w); stacks are resized map by map."""
    h, w = shape
    if values.shape[-2:] == (h, w):
        return values.astype(np.float32, copy=False)
    if values.ndim == 2:
        return cv2.resize(values.astype(np.float32), (w, h), interpolation=interp)
    return np.stack([resize_map(v, shape, interp) for v in values]) if len(values) else \
        np.zeros((0, h, w), np.float32)

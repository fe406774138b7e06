"""COCO mask encodings and the mask IoU shared by eval, ranking, proposals and export (pycocotools
RLE underneath), and
the one validation every reader of a COCO file (eval, merge, report) runs before pycocotools
sees a mask: its C decoder trusts its input, and a malformed RLE string makes it loop for
minutes without returning to Python (deaf to Ctrl-C/SIGTERM) or read out of bounds."""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .errors import InputError
from .images import MAX_PIXELS
from .runtime import read_json

# Compressed RLE (pycocotools' rleToString/rleFrString): each count is written in 5-bit chunks,
# least significant first, as chr(48 + chunk) with 0x20 = "more chunks follow" and 0x10 = sign of
# the last chunk; from the 4th count on, the difference to the count two before is written.
_RLE_CHAR_FIRST, _RLE_CHAR_LAST = 48, 48 + 63  # "0" .. "o"
# rleFrString shifts a 32-bit int by 5*k: a 7th chunk overflows it, so the C decoder would read
# another number than the one written. Six chunks hold ±2^29, more than any count or difference
# of an image within MAX_PIXELS.
_RLE_MAX_CHUNKS = 6
_RLE_ALPHABET = bytes(range(_RLE_CHAR_FIRST, _RLE_CHAR_LAST + 1))


Rle = dict[str, Any]  # COCO compressed RLE: {"size": [H, W], "counts": bytes | str}


def _encode(masks: np.ndarray) -> list[Rle]:
    """bool[N,H,W] (N ≥ 1) → N compressed RLEs with `counts` as bytes (pycocotools' own)."""
    return mask_utils.encode(np.asfortranarray(np.asarray(masks, np.uint8).transpose(1, 2, 0)))


def encode_masks(masks: np.ndarray) -> list[Rle]:
    """bool[N,H,W] → N compressed RLEs with `counts` as str (JSON-ready)."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N,H,W], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    rles = _encode(masks)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def rle_iou(a: Sequence[Rle], b: Sequence[Rle], *, crowd: bool = False) -> np.ndarray:
    """Pairwise mask IoU of compressed RLEs of one image size (pycocotools' `iou`): the one
    IoU every stage, metric and benchmark uses.

    Args:
        a: N compressed RLEs (bytes `counts`, as `to_rle` gives). b: M of the same size.
        crowd: take every `b` as a COCO crowd region: intersection / area(a) instead of IoU.

    Returns:
        float64[N,M] in [0,1]; an empty mask has IoU 0 with everything.
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float64)
    iou = mask_utils.iou(list(a), list(b), [int(crowd)] * len(b))
    return np.asarray(iou, np.float64).reshape(len(a), len(b))


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact pairwise IoU of boolean masks, through RLE (memory ∝ boundary, not area).

    Args:
        a: bool[N,H,W]. b: bool[M,H,W]; pass `a` itself for the IoU among a's masks (encoded
            once).

    Returns:
        float64[N,M] in [0,1]; 0 where both masks are empty.
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float64)
    rles = _encode(a)
    return rle_iou(rles, rles if b is a else _encode(b))


def to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) → compressed RLE."""
    if isinstance(segmentation, list):  # polygons
        if not segmentation:
            return mask_utils.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        return rle
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


def rle_string_counts(counts: str) -> list[int]:
    """Run lengths of a COCO compressed-RLE string, decoded exactly as pycocotools'
    rleFrString does (5-bit chunks, sign bit, delta coding from the 4th run on). Plain Python,
    ~0.15 µs a character: numpy costs ~40 µs a call and wins only above a few hundred
    characters, longer than most masks' strings.

    Args:
        counts: the `counts` string of a compressed RLE.

    Returns:
        the run lengths (may be negative: validity is the caller's check).

    Raises:
        ValueError: a character outside "0".."o", a run length of more than 6 characters, or a
            last run length cut off (trailing garbage: its final character says more follow).
    """
    if not counts.isascii() or counts.encode("ascii").translate(None, _RLE_ALPHABET):
        pos = next(i for i, ch in enumerate(counts) if not "0" <= ch <= "o")
        raise ValueError(f"character {counts[pos]!r} at position {pos} is not an RLE character "
                         "('0'..'o')")
    runs: list[int] = []
    append = runs.append
    x = shift = 0
    before_last = last = 0  # runs m-2 and m-1
    for pos, c in enumerate(counts.encode("ascii")):
        c -= _RLE_CHAR_FIRST
        x |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:  # more chunks follow
            if shift == 5 * _RLE_MAX_CHUNKS:
                raise ValueError(f"the run length at position {pos + 1 - _RLE_MAX_CHUNKS} is "
                                 f"longer than {_RLE_MAX_CHUNKS} characters")
            continue
        if c & 0x10:  # sign-extend: x |= -1 << 5*k
            x -= 1 << shift
        if len(runs) > 2:
            x += before_last
        append(x)
        before_last, last = last, x
        x = shift = 0
    if shift:
        raise ValueError(f"trailing garbage: the last run length "
                         f"({counts[-(shift // 5):]!r}) is cut off")
    return runs


def check_image_size(height: Any, width: Any, where: str) -> tuple[int, int]:
    """Validate an image's height and width as read from a COCO file.

    Returns:
        (height, width) as ints, each ≥ 1, their product ≤ images.MAX_PIXELS.

    Raises:
        InputError: not integers, not positive, or too large (the message starts with `where`).
    """
    dims = []
    for value in (height, width):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: image entry needs integer 'height' and 'width', got "
                             f"{_short(height)} and {_short(width)}")
        dims.append(value)
    h, w = dims
    if h <= 0 or w <= 0:
        raise InputError(f"{where}: image size {h}x{w} is not positive")
    if h * w > MAX_PIXELS:
        raise InputError(f"{where}: image size {h}x{w} is larger than {MAX_PIXELS} pixels")
    return h, w


def check_segmentation(seg: Any, height: int, width: int, where: str) -> None:
    """Validate one COCO segmentation against its image before any pycocotools call.

    Polygons: a list of polygons, each ≥ 3 points (≥ 6 numbers, an even count), finite, within
    one image size of the image (points outside it are legal; far-off ones would make
    pycocotools rasterise a huge outline). RLE: `size` equals [height, width], and `counts` (a
    compressed string or a list of ints) gives non-negative runs summing to height × width.

    Args:
        seg: the `segmentation` value as read from JSON. height, width: the image's size, already
            checked by `check_image_size`. where: file, image and annotation, for the message.

    Raises:
        InputError: one line, `where` first, saying what is wrong.
    """
    problem = _segmentation_problem(seg, height, width)
    if problem is not None:
        raise InputError(f"{where}: {problem}")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def annotation_image_id(path: Path | str, n: int, ann: Any, known: Container[Any]) -> Any:
    """The image id of `annotations[n]`, checked: an object with a segmentation, referring to an
    image listed in the file (`known`).

    Raises:
        InputError: one line naming the file and the annotation index.
    """
    if not isinstance(ann, dict) or "segmentation" not in ann:
        raise InputError(f"{path}: annotations[{n}] has no 'segmentation'")
    image_id = ann.get("image_id")
    if not valid_id(image_id) or image_id not in known:
        raise InputError(f"{path}: annotations[{n}] refers to unknown image_id "
                         f"{_short(image_id)}")
    return image_id


def _segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    if isinstance(seg, list):
        return _polygons_problem(seg, height, width)
    if not isinstance(seg, dict):
        return ("segmentation must be a list of polygons or an RLE {'size', 'counts'}, got "
                f"{type(seg).__name__}")
    if "size" not in seg or "counts" not in seg:
        keys = _short(sorted(map(str, seg)))
        return f"RLE segmentation needs 'size' and 'counts', got keys {keys}"
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) for d in size)):
        return f"RLE 'size' must be [height, width] integers, got {_short(size)}"
    if size != [height, width]:
        return f"mask is {size[0]}x{size[1]} (HxW) but the image is {height}x{width}"
    counts = seg["counts"]
    if isinstance(counts, str):
        kind = "compressed RLE 'counts'"
        try:
            runs = rle_string_counts(counts)
        except ValueError as exc:
            return f"{kind} is malformed: {exc}"
    elif isinstance(counts, list):
        kind = "uncompressed RLE 'counts'"
        for i, c in enumerate(counts):
            if isinstance(c, bool) or not isinstance(c, int):
                return f"{kind} must be integers, got {_short(c)} at run {i}"
        runs = counts
    else:
        return f"RLE 'counts' must be a string or a list of integers, got {type(counts).__name__}"
    for i, r in enumerate(runs):
        if r < 0:
            return f"{kind} has a negative run length ({r} at run {i})"
    total = sum(runs)
    if total != height * width:
        return (f"{kind} covers {total} pixels but the {height}x{width} image has "
                f"{height * width}")
    return None


def _polygons_problem(polygons: list[Any], height: int, width: int) -> str | None:
    margin = max(height, width)  # one image size beyond each border
    for k, poly in enumerate(polygons):
        if not isinstance(poly, list):
            return f"polygon {k} must be a list of numbers, got {type(poly).__name__}"
        for i, x in enumerate(poly):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                return f"polygon {k} coordinate {i} is not a number: {_short(x)}"
            if not math.isfinite(x):
                return f"polygon {k} coordinate {i} is not finite: {x}"
            limit = width if i % 2 == 0 else height
            if not -margin <= x <= limit + margin:
                return (f"polygon {k} coordinate {i} ({x:g}) is far outside the {height}x{width} "
                        "image (allowed: up to one image size beyond its border)")
        if len(poly) % 2:
            return f"polygon {k} has an odd number of coordinates ({len(poly)})"
        if len(poly) < 6:
            return f"polygon {k} has {len(poly) // 2} point(s); a polygon needs at least 3"
    return None


def read_dataset(path: Path) -> dict[str, Any]:
    """A COCO dataset file (`coseg run`'s instances.json), parsed and every mask validated.

    Raises:
        InputError: unreadable, not a dict with 'images' and 'annotations' lists, or a bad mask.
    """
    data = read_json(path, "instances")
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise InputError(f"{path} is not a COCO dataset dict")
    check_dataset_masks(data, path)
    return data


def check_dataset_masks(data: dict[str, Any], path: Path) -> None:
    """Validate every image size and every annotation's mask of a COCO dataset dict (what
    `coseg merge` and `coseg report` read; `coseg eval` checks the same way as it loads).

    Raises:
        InputError: the first problem, naming `path`, the image and the annotation index.
    """
    sizes: dict[Any, tuple[int, int, str]] = {}
    for n, entry in enumerate(data.get("images") or []):
        if not isinstance(entry, dict) or not valid_id(entry.get("id")):
            raise InputError(f"{path}: images[{n}] needs an integer or string 'id'")
        label = image_label(entry)
        h, w = check_image_size(entry.get("height"), entry.get("width"),
                                f"{path}: image {label}")
        sizes[entry["id"]] = (h, w, label)
    for n, ann in enumerate(data.get("annotations") or []):
        h, w, label = sizes[annotation_image_id(path, n, ann, sizes)]
        problem = _segmentation_problem(ann["segmentation"], h, w)
        if problem is not None:  # the location is formatted only when needed: files are large
            raise InputError(f"{annotation_where(path, n, ann, label)}: {problem}")


def valid_id(value: Any) -> bool:
    """Whether a COCO image id can be used: an int (not a bool) or a string."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def image_label(entry: dict[str, Any]) -> str:
    """How messages name an image entry: its file_name, else "id N"."""
    name = entry.get("file_name")
    return str(name) if name else f"id {_short(entry.get('id'))}"


def annotation_where(path: Path, index: int, ann: dict[str, Any], label: str) -> str:
    """The location prefix of a mask problem: file, annotation index (and id), image."""
    ann_id = ann.get("id")
    tag = f" (id {_short(ann_id)})" if ann_id is not None else ""
    return f"{path}: annotations[{index}]{tag} of image {label}"


def decode(rle: dict[str, Any]) -> np.ndarray:
    """Compressed RLE → bool[H,W]."""
    return mask_utils.decode(rle).astype(bool)


def bbox_xywh(mask: np.ndarray) -> list[float]:
    """Tight box [x, y, w, h] of a bool[H,W] mask (zeros for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]

"""COCO mask encodings shared by eval, proposals and export (pycocotools RLE underneath)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """bool[N,H,W] → N compressed RLEs with `counts` as str (JSON-ready)."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N,H,W], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


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

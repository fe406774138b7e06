"""Write a run to disk: COCO JSON, per-instance PNGs, label maps, overlays, co-saliency heat
maps and the manifest. `FolderWriter` takes each image's results as soon as they are final and
keeps only their compact encodings, so memory does not grow with the folder; `write_all` writes a
whole RunResult through it. Every file is written atomically (temp file + rename), and a folder of
per-instance masks is swapped in whole, so an interrupted run never leaves half an output."""

from __future__ import annotations

import colorsys
import shutil
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
from PIL import Image

from . import coco
from .errors import InputError, OutputError
from .images import pixels
from .manifest import MANIFEST_NAME, Manifest
from .matches import matches_document
from .records import EncodedInstance, ImageRecord, Instance, RunResult
from .runtime import atomic_path, atomic_write_json, write_error

OUTPUT_DIRS = ("masks", "labels", "overlays", "cosaliency")


def output_stems(names: Sequence[str]) -> list[str]:
    """File stems for outputs: the image stem, or its sanitised relative name on a clash.

    Args:
        names: each image's path relative to the input folder (posix), as ImageRecord.name and
            instances.json's file_name hold it.
    """
    stems = [PurePosixPath(n).stem for n in names]
    clash = {s for s in stems if stems.count(s) > 1}
    return [n.replace("/", "__").replace(".", "_") if s in clash else s
            for n, s in zip(names, stems)]


def encode_instance(inst: Instance) -> EncodedInstance:
    """The instance with its mask as COCO RLE, box and area (what the JSON outputs need)."""
    return EncodedInstance(
        image_index=inst.image_index, segmentation=coco.encode_masks(inst.mask[None])[0],
        bbox_xywh=coco.bbox_xywh(inst.mask), area=int(inst.mask.sum()), score=inst.score,
        peak_xy=inst.peak_xy, rank=inst.rank, embedding=inst.embedding)


def instances_coco(result: RunResult) -> dict[str, Any]:
    """COCO dataset dict of the predictions; loads unchanged in pycocotools COCO()/loadRes()."""
    return coco_document(result.images, [encode_instance(t) for t in result.instances],
                         result.config, result.category)


def coco_document(images: Sequence[ImageRecord], instances: Sequence[EncodedInstance],
                  config: dict[str, Any], category: str) -> dict[str, Any]:
    """instances.json: `instances_coco` from encoded instances (ids by image, then rank)."""
    entries = [{"id": i + 1, "file_name": r.name, "height": r.height, "width": r.width}
               for i, r in enumerate(images)]
    annotations = []
    for ann_id, inst in enumerate(sorted(instances, key=lambda t: (t.image_index, t.rank)),
                                  start=1):
        annotations.append({
            "id": ann_id,
            "image_id": inst.image_index + 1,
            "category_id": 1,
            "segmentation": inst.segmentation,
            "bbox": inst.bbox_xywh,
            "area": inst.area,
            "iscrowd": 0,
            "score": float(inst.score),
            "peak": [int(inst.peak_xy[0]), int(inst.peak_xy[1])],
            "rank": int(inst.rank),
        })
    return {
        "info": {"description": "coseg instance co-segmentation", "coseg_config": config},
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": 1, "name": category, "supercategory": category}],
    }


def instance_colours(n: int) -> np.ndarray:
    """uint8[n,3] well-separated RGB colours (golden-ratio hue walk), stable across runs."""
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb((0.07 + i * 0.618034) % 1.0,
                                                                 0.85, 0.95)]
                     for i in range(n)], dtype=np.uint8).reshape(n, 3)


def render_overlay(image: np.ndarray, instances: list[Instance]) -> np.ndarray:
    """uint8[H,W,3]: the photo with a translucent fill, a contour and a score label per instance."""
    colours = instance_colours(len(instances))
    ordered = sorted(instances, key=lambda t: t.rank)
    canvas = np.empty_like(image)
    # Blend a band of rows at a time: a float copy of a 108 Mpx photo alone would take 1.3 GB.
    for y0, y1 in _row_bands(image.shape):
        band = image[y0:y1].astype(np.float32)
        for inst, colour in zip(ordered, colours):
            m = inst.mask[y0:y1]
            band[m] = 0.55 * band[m] + 0.45 * colour
        canvas[y0:y1] = band.astype(np.uint8)
    thickness = max(1, round(max(image.shape[:2]) / 400))
    scale = max(0.35, max(image.shape[:2]) / 1400)
    for inst, colour in zip(ordered, colours):
        contours, _ = cv2.findContours(inst.mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, tuple(int(c) for c in colour), thickness)
    for inst, colour in zip(ordered, colours):
        x, y = inst.peak_xy
        label = f"{inst.rank}: {inst.score:.3g}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        x = int(np.clip(x - tw // 2, 0, max(0, image.shape[1] - tw)))
        y = int(np.clip(y, th + base, image.shape[0] - 1))
        cv2.rectangle(canvas, (x, y - th - base), (x + tw, y), (0, 0, 0), -1)
        cv2.putText(canvas, label, (x, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    tuple(int(c) for c in colour), 1, cv2.LINE_AA)
    return canvas


def label_map(shape: tuple[int, int], instances: list[Instance]) -> np.ndarray:
    """Instance-id map: 0 background, 1..N by rank (the better instance wins overlaps);
    uint8, or uint16 when N > 255."""
    dtype = np.uint8 if len(instances) <= 255 else np.uint16
    labels = np.zeros(shape, dtype)
    for inst in sorted(instances, key=lambda t: t.rank, reverse=True):
        labels[inst.mask] = inst.rank
    return labels


def heat_map(cosal: np.ndarray) -> np.ndarray:
    """uint8[H,W,3] RGB heat map (JET) of a [0,1] map (computed by bands of rows, so a huge
    map needs no full-size float temporaries)."""
    heat = np.empty((*cosal.shape[:2], 3), np.uint8)
    for y0, y1 in _row_bands(cosal.shape):
        u8 = np.clip(np.round(cosal[y0:y1] * 255), 0, 255).astype(np.uint8)
        heat[y0:y1] = cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return heat


_BAND_PIXELS = 1 << 22  # 4 Mpx per band: ≤ 100 MB of float temporaries for an RGB band


def _row_bands(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(y0, y1) row ranges covering an image of `shape` with about _BAND_PIXELS pixels each."""
    h, w = int(shape[0]), int(shape[1])
    rows = max(1, _BAND_PIXELS // max(1, w))
    return [(y0, min(h, y0 + rows)) for y0 in range(0, h, rows)]


def save_image(path: Path, array: np.ndarray, **params: Any) -> None:
    """Atomically write a PNG/JPEG with Pillow (16-bit grayscale kept as 16-bit)."""
    img = Image.fromarray(array, mode="I;16") if array.dtype == np.uint16 else \
        Image.fromarray(array)
    with atomic_path(path) as tmp:
        img.save(tmp, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG",
                 **params)


def write_instance_masks(folder: Path, instances: list[Instance]) -> None:
    """Replace `folder` with one binary PNG per instance named by rank, swapped in whole."""
    tmp = folder.with_name(f".{folder.name}.part")
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # an interrupt (SIGINT → KeyboardInterrupt) must not leave the half-written folder
        tmp.mkdir(parents=True)
        for inst in instances:
            Image.fromarray(inst.mask.astype(np.uint8) * 255).save(tmp / f"{inst.rank}.png")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
    except BaseException as exc:
        if old.exists() and not folder.exists():
            old.rename(folder)  # put the previous complete folder back
        if isinstance(exc, OSError):  # disk full, read-only: one clear line, not a traceback
            raise OutputError(write_error(folder, exc)) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def check_writable(out: Path) -> None:
    """Fail early, before any work, when OUT cannot hold our outputs."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output path exists and is not a folder: {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".coseg-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None


class FolderWriter:
    """ResultSink (records.py) that writes each image's files into `out` as soon as they are
    final and keeps only encoded instances for the JSON outputs, which `finish` writes.

    A class because the sink carries state between calls (the folder's stems, the encoded
    instances, whether the old manifest is already gone); the writing itself is the functions
    above. The manifest is not written here: the caller writes it last (`write_manifest`), its
    presence marking a complete folder, so an old one is removed before the first file.
    """

    def __init__(self, out: Path, images: Sequence[ImageRecord], *,
                 overlays: bool = True) -> None:
        self.out = Path(out)
        self.images = list(images)
        self.overlays = overlays
        self.stems = output_stems([r.name for r in self.images])
        self.encoded: list[EncodedInstance] = []
        self.seconds = 0.0  # spent writing per-image files
        self._opened = False

    def _open(self) -> None:
        """Before the first file: drop the old manifest and outputs of images no longer here."""
        if self._opened:
            return
        check_writable(self.out)
        (self.out / MANIFEST_NAME).unlink(missing_ok=True)
        for stem in _existing_stems(self.out) - set(self.stems):
            shutil.rmtree(self.out / "masks" / stem, ignore_errors=True)
            for sub, ext in (("labels", ".png"), ("overlays", ".jpg"), ("cosaliency", ".png")):
                (self.out / sub / f"{stem}{ext}").unlink(missing_ok=True)
        self._opened = True

    def add_cosaliency(self, index: int, cosal: np.ndarray) -> None:
        """cosaliency/<stem>.png from float32[H,W] in [0,1]."""
        t0 = time.perf_counter()
        self._open()
        save_image(self.out / "cosaliency" / f"{self.stems[index]}.png", heat_map(cosal))
        self.seconds += time.perf_counter() - t0

    def add_instances(self, index: int, instances: list[Instance]) -> None:
        """masks/<stem>/, labels/<stem>.png and overlays/<stem>.jpg of one image; keeps each
        instance encoded (RLE, box, area) for instances.json and matches.json."""
        t0 = time.perf_counter()
        self._open()
        rec, stem = self.images[index], self.stems[index]
        insts = sorted(instances, key=lambda t: t.rank)
        write_instance_masks(self.out / "masks" / stem, insts)
        save_image(self.out / "labels" / f"{stem}.png", label_map(rec.shape, insts))
        if self.overlays:  # the photo read again when only its working copy is held
            save_image(self.out / "overlays" / f"{stem}.jpg",
                       render_overlay(pixels(rec), insts), quality=90)
        self.encoded += [encode_instance(t) for t in insts]
        self.seconds += time.perf_counter() - t0

    def finish(self, config: dict[str, Any], category: str) -> dict[str, float]:
        """Write matches.json and instances.json. Returns seconds spent per output kind."""
        t0 = time.perf_counter()
        self._open()
        atomic_write_json(self.out / "matches.json",
                          matches_document([r.name for r in self.images], self.encoded))
        atomic_write_json(self.out / "instances.json",
                          coco_document(self.images, self.encoded, config, category))
        return {"files": self.seconds, "json": time.perf_counter() - t0}


def write_all(result: RunResult, out: Path, *, overlays: bool = True) -> dict[str, float]:
    """Write every output of one folder into `out` except the manifest, which the caller writes
    last (`write_manifest`): its presence marks a complete folder, so an old one is removed first.
    Returns seconds spent per output kind."""
    writer = FolderWriter(out, result.images, overlays=overlays)
    result.send_to(writer)
    return writer.finish(result.config, result.category)


def _existing_stems(out: Path) -> set[str]:
    masks = out / "masks"
    if not masks.is_dir():
        return set()
    return {p.name for p in masks.iterdir() if p.is_dir() and not p.name.startswith(".")}


def write_manifest(out: Path, manifest: Manifest) -> None:
    """The manifest is written last: its presence marks a complete output folder."""
    atomic_write_json(Path(out) / MANIFEST_NAME, manifest.to_json())


def write_prior_map(out_dir: Path, stem: str, prior: np.ndarray, *, npy: bool = False) -> None:
    """`coseg saliency` output: float32[H,W] map as OUT/<stem>.png (8-bit), optionally .npy."""
    save_image(Path(out_dir) / f"{stem}.png",
               np.clip(np.round(prior * 255.0), 0, 255).astype(np.uint8))
    if npy:
        with atomic_path(Path(out_dir) / f"{stem}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, prior.astype(np.float32))

"""Score predicted instance masks against ground truth: mAP^r@t and CorLoc^r (DeepCO3 protocol).

Semantics (the paper's §4.2; README.md, "Evaluation (`coseg eval`)"):

* Per category, all images are pooled. In each image the predictions are taken by descending
  score (ties: input order) and each is matched to the not-yet-matched GT instance of highest mask
  IoU; it is a true positive iff that IoU > t (strict).
* AP is the VOC all-point interpolated area under precision/recall, recall over every non-crowd
  GT instance of the category. mAP is the mean of the per-category APs.
* CorLoc is the % of images (with at least one non-crowd GT instance) whose top-scored
  prediction has IoU > 0.5 with some GT instance.
* Crowd / ignore regions (COCO `iscrowd=1`, PNG value 255) are merged per image into one region.
  They are never GT instances (no recall needed). A prediction that is not a true positive but
  covers the crowd region COCO-style — intersection / area(prediction) > t — is ignored: neither
  TP nor FP (for CorLoc: skipped when picking the image's top prediction). Pixels of the crowd
  region still count in the IoU with real instances, as in COCO.
* Category ids are not compared: one category per GT file/folder (co-segmentation is
  class-agnostic within a folder).

All IoUs come from pycocotools' RLE `iou`, vectorised per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from .coco import (
    Rle,
    annotation_image_id,
    annotation_where,
    check_dataset_masks,
    check_image_size,
    check_segmentation,
    encode_masks,
    image_label,
    rle_iou,
    to_rle,
    valid_id,
)
from .errors import ConfigError, InputError
from .runtime import read_json

DEFAULT_IOU_THRESHOLDS: tuple[float, ...] = (0.25, 0.5, 0.75)  # paper Table 2 (+0.75)
CORLOC_IOU_THRESH = 0.5  # paper Table 4: CorLoc^r at IoU > 0.5
GT_JSON_NAME = "annotations.json"  # layout of ../shared/data/coco-dev
PRED_JSON_NAME = "instances.json"  # what `coseg run` writes
PNG_IGNORE_VALUE = 255  # crowd / ignore region in instance-id PNGs
_MAX_NAMED = 5  # names listed in a warning before "…"


# --------------------------------------------------------------------------- pure metrics


def crowd_overlap(pred_rles: Sequence[Rle], crowd_rle: Rle | None) -> np.ndarray:
    """COCO-style overlap with an ignore region: intersection / area(prediction).

    Args:
        pred_rles: K compressed RLEs. crowd_rle: one compressed RLE (the merged ignore region)
            or None.

    Returns:
        float64[K] in [0,1]; zeros when there is no crowd region.
    """
    if crowd_rle is None:
        return np.zeros(len(pred_rles), np.float64)
    return rle_iou(pred_rles, [crowd_rle], crowd=True)[:, 0]


def score_order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; ties keep input order (stable), so results are deterministic."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def _greedy_match(ious: np.ndarray, crowd_ov: np.ndarray, order: np.ndarray,
                  iou_thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching on a precomputed IoU table (see `match_image`); K is small, G too."""
    num_pred, num_gt = ious.shape
    tp = np.zeros(num_pred, bool)
    ignored = np.zeros(num_pred, bool)
    taken = np.zeros(num_gt, bool)
    for k in order:
        if num_gt:
            candidates = np.where(taken, -1.0, ious[k])
            g = int(np.argmax(candidates))
            if candidates[g] > iou_thresh:
                tp[k] = True
                taken[g] = True
                continue
        if crowd_ov[k] > iou_thresh:
            ignored[k] = True
    return tp, ignored


def match_image(pred_rles: Sequence[Rle], scores: Sequence[float] | np.ndarray,
                gt_rles: Sequence[Rle], iou_thresh: float,
                crowd_rle: Rle | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Match one image's predictions to its GT instances, greedily by descending score.

    Each prediction takes the not-yet-matched GT instance of highest IoU and is a TP iff that
    IoU > iou_thresh (strict). A non-TP prediction whose intersection / own area with the crowd
    region exceeds iou_thresh is ignored.

    Args:
        pred_rles: K compressed RLEs. scores: float[K]. gt_rles: G non-crowd GT RLEs.
        iou_thresh: t in [0, 1). crowd_rle: merged ignore region of the image, or None.

    Returns:
        (tp, ignored): bool[K] each, in the input order of `pred_rles`.
    """
    ious = rle_iou(pred_rles, gt_rles)
    return _greedy_match(ious, crowd_overlap(pred_rles, crowd_rle),
                         score_order(np.asarray(scores)), iou_thresh)


def average_precision(tp: Sequence[bool] | np.ndarray, num_gt: int) -> float:
    """VOC all-point interpolated AP (VOC2010+ `voc_ap`), recall over all GT instances.

    Args:
        tp: bool[K], the TP flag of every (non-ignored) prediction in descending score order.
        num_gt: number of GT instances the predictions could have found.

    Returns:
        AP in [0, 1]; 0.0 for no predictions; NaN when num_gt == 0 (AP undefined).
    """
    tp = np.asarray(tp, bool).reshape(-1)
    if num_gt <= 0:
        return math.nan
    if tp.size == 0:
        return 0.0
    ctp = np.cumsum(tp, dtype=np.float64)
    recall = ctp / num_gt
    precision = ctp / np.arange(1, tp.size + 1, dtype=np.float64)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def corloc(top_ious: Sequence[float] | np.ndarray,
           iou_thresh: float = CORLOC_IOU_THRESH) -> float:
    """Fraction of images whose top-scored prediction localises an instance.

    Args:
        top_ious: float[N], per image with GT, the highest IoU of its top-scored prediction with
            any GT instance (0 for an image without predictions).
        iou_thresh: strict threshold (paper: 0.5).

    Returns:
        CorLoc in [0, 1]; NaN when N == 0.
    """
    top_ious = np.asarray(top_ious, np.float64).reshape(-1)
    if top_ious.size == 0:
        return math.nan
    return float(np.mean(top_ious > iou_thresh))


def metric_key(iou_thresh: float) -> str:
    """Column name of one threshold: 0.25 → "AP25", 0.5 → "AP50"."""
    return f"AP{round(100 * iou_thresh)}"


# --------------------------------------------------------------------------- records


@dataclass
class GTImage:
    """Ground truth of one image: non-crowd instance RLEs plus the merged crowd region."""

    file_name: str
    image_id: int | None
    height: int
    width: int
    rles: list[Rle]
    crowd: Rle | None = None


@dataclass
class GTCategory:
    """Every GT image of one category, with lookups used to match prediction images."""

    name: str
    images: list[GTImage]
    source: Path

    def __post_init__(self) -> None:
        self.by_file: dict[str, int] = {}
        by_base: dict[str, list[int]] = {}
        by_stem: dict[str, list[int]] = {}
        self.by_id: dict[int, int] = {}
        for i, im in enumerate(self.images):
            self.by_file.setdefault(im.file_name, i)
            by_base.setdefault(Path(im.file_name).name, []).append(i)
            by_stem.setdefault(Path(im.file_name).stem, []).append(i)
            if im.image_id is not None:
                self.by_id[im.image_id] = i
        # Only unambiguous names are usable for matching.
        self.by_base = {k: v[0] for k, v in by_base.items() if len(v) == 1}
        self.by_stem = {k: v[0] for k, v in by_stem.items() if len(v) == 1}

    def lookup(self, file_name: str | None, image_id: Any) -> int | None:
        """Index of the GT image a prediction image refers to: by file name (exact, basename,
        then stem), or by id when the prediction carries no file name."""
        if file_name:
            for table, key in ((self.by_file, file_name), (self.by_base, Path(file_name).name),
                               (self.by_stem, Path(file_name).stem)):
                if key in table:
                    return table[key]
            return None
        if isinstance(image_id, int) and not isinstance(image_id, bool):
            return self.by_id.get(image_id)
        return None


@dataclass
class ImagePredictions:
    """Predictions of one category, grouped by GT image index, plus what could not be placed."""

    rles: list[list[Rle]]
    scores: list[list[float]]
    unknown_preds: int = 0
    unknown_images: list[str] = field(default_factory=list)

    @property
    def num_pred(self) -> int:
        return sum(len(r) for r in self.rles)


@dataclass(frozen=True)
class EvalResult:
    """Scores in percent (0–100).

    Attributes:
        iou_thresholds: the t of each AP column.
        per_category: name → {"AP25", "AP50", "AP75", "CorLoc", "n_images", "n_gt", "n_pred"}
            (None where undefined: a category without GT instances).
        mean: {"mAP25", ..., "CorLoc"} over categories where the value is defined.
        warnings: human-readable notes (unknown images, missing categories).
    """

    iou_thresholds: tuple[float, ...]
    per_category: dict[str, dict[str, float | int | None]]
    mean: dict[str, float | None]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON object `coseg eval --json` prints (json.dumps-ready, no NaN)."""
        return {"per_category": {k: dict(v) for k, v in self.per_category.items()},
                "mean": dict(self.mean)}


# --------------------------------------------------------------------------- reading inputs


def _rle_of(seg: Any, height: int, width: int, where: str) -> Rle:
    """Any COCO segmentation → compressed RLE at (height, width), validated first."""
    check_segmentation(seg, height, width, where)
    return to_rle(seg, height, width)


def _is_dataset(data: Any) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list))


def load_gt_json(path: Path, name: str | None = None) -> GTCategory:
    """Read a COCO instances JSON (one category) as ground truth.

    Args:
        path: the JSON file. name: category name; default categories[0].name, else the
            parent folder's name.

    Raises:
        InputError: missing/unparseable file, not a COCO dataset, several categories, bad masks.
    """
    data = read_json(path, "ground truth")
    if not _is_dataset(data):
        raise InputError(f"ground truth {path} is not a COCO instances JSON (needs 'images' and "
                         "'annotations' lists)")
    cats = data.get("categories")
    cats = cats if isinstance(cats, list) else []
    if len(cats) > 1:
        raise InputError(f"ground truth {path} holds {len(cats)} categories; coseg eval scores "
                         "one category per file (use a <category>/annotations.json root)")
    if name is None:
        first = cats[0] if cats and isinstance(cats[0], dict) else {}
        name = str(first.get("name") or path.resolve().parent.name)
    check_dataset_masks(data, path)
    images: list[GTImage] = []
    index: dict[Any, int] = {}
    for entry in data["images"]:
        h, w = check_image_size(entry["height"], entry["width"], str(path))
        index[entry["id"]] = len(images)
        images.append(GTImage(str(entry.get("file_name") or ""), entry["id"], h, w, []))
    crowds: dict[int, list[Rle]] = {}
    for ann in data["annotations"]:
        i = index[ann["image_id"]]
        rle = to_rle(ann["segmentation"], images[i].height, images[i].width)
        if ann.get("iscrowd"):
            crowds.setdefault(i, []).append(rle)
        else:
            images[i].rles.append(rle)
    for i, regions in crowds.items():
        images[i].crowd = regions[0] if len(regions) == 1 else mask_utils.merge(regions,
                                                                                 intersect=0)
    return GTCategory(name, images, path)


def load_gt_pngs(folder: Path, name: str | None = None) -> GTCategory:
    """Read a folder of instance-id PNGs (0 background, 1..N instances, 255 ignore).

    Args:
        folder: holds <stem>.png per image. name: category name; default the folder's name (its
            parent's when the folder is called "masks").

    Raises:
        InputError: no PNGs, unreadable or multi-channel PNG.
    """
    files = sorted((p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == ".png"),
                   key=lambda p: p.name)
    if not files:
        raise InputError(f"ground truth folder {folder} holds no .png instance maps")
    if name is None:
        resolved = folder.resolve()
        name = resolved.parent.name if resolved.name == "masks" else resolved.name
    images: list[GTImage] = []
    for p in files:
        try:
            with Image.open(p) as img:
                if img.mode not in ("L", "P"):
                    raise InputError(f"{p}: instance map must be a single-channel 8-bit PNG, "
                                     f"got mode {img.mode}")
                ids = np.asarray(img)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError,
                SyntaxError) as exc:
            raise InputError(f"{p}: unreadable PNG ({exc})") from None
        values = np.unique(ids)
        inst = values[(values != 0) & (values != PNG_IGNORE_VALUE)]
        h, w = ids.shape
        rles = [to_rle(r, h, w) for r in encode_masks(ids[None] == inst[:, None, None])]
        crowd = None
        if PNG_IGNORE_VALUE in values:
            crowd = to_rle(encode_masks((ids == PNG_IGNORE_VALUE)[None])[0], h, w)
        images.append(GTImage(p.name, None, int(h), int(w), rles, crowd))
    return GTCategory(name, images, folder)


def _prediction_images(path: Path, entries: list[Any], gt: GTCategory
                       ) -> dict[Any, tuple[int | None, str]]:
    """The `images` of a predictions dataset dict: each id → (index of its GT image, or None
    when the GT has no such image; a label naming it in messages).

    Raises:
        InputError: an entry without an integer or string id, or whose size differs from its
            GT image's.
    """
    pimages: dict[Any, tuple[int | None, str]] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or not valid_id(entry.get("id")):
            raise InputError(f"{path}: images[{n}] needs an integer or string 'id'")
        fname = entry.get("file_name")
        i = gt.lookup(str(fname) if fname else None, entry["id"])
        label = image_label(entry)
        if i is not None and "height" in entry and "width" in entry:
            h, w = check_image_size(entry["height"], entry["width"], f"{path}: image {label}")
            im = gt.images[i]
            if (h, w) != (im.height, im.width):
                raise InputError(f"{path}: image {label} is {h}x{w} (HxW) in the predictions "
                                 f"but {im.height}x{im.width} in the ground truth")
        pimages[entry["id"]] = (i, label)
    return pimages


def load_predictions(path: Path, gt: GTCategory) -> ImagePredictions:
    """Read predictions and place them on the GT images.

    Args:
        path: coseg's instances.json (COCO dataset dict whose annotations carry `score`), a run
            folder holding it, or a COCO results list [{image_id, segmentation, score}].
        gt: the category they are scored against (ids of a results list resolve against it).

    Raises:
        InputError: missing/unparseable file, missing score, a mask whose size differs from its
            image's GT size (the message names the image).
    """
    if path.is_dir():
        path = path / PRED_JSON_NAME
    data = read_json(path, "predictions")
    preds = ImagePredictions([[] for _ in gt.images], [[] for _ in gt.images])
    unknown: dict[str, int] = {}

    def add(i: int | None, label: str, seg: Any, score: Any, where: str) -> None:
        if i is None:
            preds.unknown_preds += 1
            unknown[label] = unknown.get(label, 0) + 1
            return
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(
                score):
            raise InputError(f"{where}: needs a finite numeric 'score', got {score!r}")
        im = gt.images[i]
        preds.rles[i].append(_rle_of(seg, im.height, im.width, where))
        preds.scores[i].append(float(score))

    if _is_dataset(data):
        pimages = _prediction_images(path, data["images"], gt)
        for n, ann in enumerate(data["annotations"]):
            i, label = pimages[annotation_image_id(path, n, ann, pimages)]
            add(i, label, ann["segmentation"], ann.get("score"),
                annotation_where(path, n, ann, label))
    elif isinstance(data, list):
        if data and not gt.by_id:
            raise InputError(f"predictions {path} are a COCO results list (image ids only) but "
                             f"the ground truth {gt.source} has no image ids; use a GT "
                             "annotations JSON or predictions with file names (instances.json)")
        for n, res in enumerate(data):
            if not isinstance(res, dict) or "segmentation" not in res or "image_id" not in res:
                raise InputError(f"{path}: result {n} needs 'image_id', 'segmentation' and "
                                 "'score'")
            i = gt.lookup(None, res["image_id"])
            label = f"id {res['image_id']}"
            if i is not None:
                im = gt.images[i]
                label = im.file_name or label
            add(i, label, res["segmentation"], res.get("score"),
                f"{path}: result {n} (image {label})")
    else:
        raise InputError(f"predictions {path} are neither a COCO dataset dict nor a COCO "
                         "results list")
    preds.unknown_images = sorted(unknown)
    return preds


# --------------------------------------------------------------------------- evaluation


def _check_thresholds(iou_thresholds: Sequence[float]) -> tuple[float, ...]:
    ts = tuple(float(t) for t in iou_thresholds)
    if not ts:
        raise ConfigError("at least one IoU threshold is needed")
    for t in ts:
        if not 0.0 <= t < 1.0:
            raise ConfigError(f"IoU threshold must be in [0, 1), got {t}")
    keys = [metric_key(t) for t in ts]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"IoU thresholds {', '.join(map(str, ts))} give duplicate columns "
                          f"{', '.join(keys)}")
    return ts


def _pct(x: float) -> float | None:
    return None if math.isnan(x) else round(100.0 * x, 4)


def evaluate_category(gt: GTCategory, preds: ImagePredictions,
                      iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                      ) -> dict[str, float | int | None]:
    """Metrics of one category in percent: {AP<t>..., CorLoc, n_images, n_gt, n_pred}."""
    ts = _check_thresholds(iou_thresholds)
    all_scores: list[np.ndarray] = []
    all_tp: dict[float, list[np.ndarray]] = {t: [] for t in ts}
    all_ign: dict[float, list[np.ndarray]] = {t: [] for t in ts}
    top_ious: list[float] = []
    num_gt = 0
    for im, rles, scores in zip(gt.images, preds.rles, preds.scores, strict=True):
        num_gt += len(im.rles)
        score_arr = np.asarray(scores, np.float64)
        order = score_order(score_arr)
        ious = rle_iou(rles, im.rles)
        crowd_ov = crowd_overlap(rles, im.crowd)
        all_scores.append(score_arr)
        for t in ts:
            tp, ign = _greedy_match(ious, crowd_ov, order, t)
            all_tp[t].append(tp)
            all_ign[t].append(ign)
        if im.rles:
            # CorLoc: top-scored prediction, skipping those that only cover the crowd region.
            best = ious.max(axis=1) if len(rles) else np.zeros(0)
            decisive = (best > CORLOC_IOU_THRESH) | (crowd_ov <= CORLOC_IOU_THRESH)
            ranked = order[decisive[order]]
            top_ious.append(float(best[ranked[0]]) if ranked.size else 0.0)
    scores_cat = np.concatenate(all_scores) if all_scores else np.zeros(0)
    pooled = score_order(scores_cat)
    result: dict[str, float | int | None] = {}
    for t in ts:
        tp_cat = np.concatenate(all_tp[t]) if all_tp[t] else np.zeros(0, bool)
        ign_cat = np.concatenate(all_ign[t]) if all_ign[t] else np.zeros(0, bool)
        keep = pooled[~ign_cat[pooled]]
        result[metric_key(t)] = _pct(average_precision(tp_cat[keep], num_gt))
    result["CorLoc"] = _pct(corloc(top_ious))
    result["n_images"] = len(gt.images)
    result["n_gt"] = num_gt
    result["n_pred"] = preds.num_pred
    return result


def _resolve_gt(gt: Path) -> tuple[str, Path]:
    """Kind of GT input: ("json", file) | ("png", folder) | ("root", folder)."""
    if not gt.exists():
        raise InputError(f"ground truth not found: {gt}")
    if gt.is_file():
        return "json", gt
    if (gt / GT_JSON_NAME).is_file():
        return "json", gt / GT_JSON_NAME
    if any(p.is_dir() and (p / GT_JSON_NAME).is_file() for p in gt.iterdir()):
        return "root", gt
    if any(p.suffix.lower() == ".png" for p in gt.iterdir()):
        return "png", gt
    raise InputError(f"ground truth folder {gt} holds neither {GT_JSON_NAME}, "
                     f"<category>/{GT_JSON_NAME} nor instance-id PNGs")


def _named(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    return shown + (", …" if len(items) > _MAX_NAMED else "")


def _unknown_warning(name: str, preds: ImagePredictions) -> list[str]:
    if not preds.unknown_preds:
        return []
    n_img = len(preds.unknown_images)
    return [(f"{name}: {preds.unknown_preds} prediction(s) on {n_img} image(s) not in the "
             f"ground truth, not scored ({_named(preds.unknown_images)})")]


def evaluate(gt: Path, pred: Path,
             iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS) -> EvalResult:
    """Score predictions against ground truth (mAP^r at each threshold, CorLoc^r).

    Args:
        gt: a COCO instances JSON; a folder holding annotations.json; a folder of instance-id
            PNGs; or a root holding <category>/annotations.json.
        pred: instances.json / a run folder / a COCO results list; for a GT root, a root
            holding <category>/instances.json (or <category>/ run folders).
        iou_thresholds: each t in [0, 1); a prediction matches iff IoU > t.

    Returns:
        EvalResult with percentages.

    Raises:
        InputError: unreadable or inconsistent inputs. ConfigError: bad thresholds.
    """
    ts = _check_thresholds(iou_thresholds)
    gt, pred = Path(gt), Path(pred)
    kind, gt_path = _resolve_gt(gt)
    warnings: list[str] = []
    if kind == "root":
        per_category = _evaluate_root(gt, pred, ts, warnings)
    else:
        gcat = load_gt_json(gt_path) if kind == "json" else load_gt_pngs(gt_path)
        preds = load_predictions(pred, gcat)
        per_category = {gcat.name: evaluate_category(gcat, preds, ts)}
        warnings += _unknown_warning(gcat.name, preds)
    for name, res in per_category.items():
        if res["n_gt"] == 0:
            warnings.append(f"{name}: no non-crowd GT instances; AP undefined, left out of the "
                            "mean")
    return EvalResult(ts, per_category, _category_means(per_category, ts), warnings)


def _evaluate_root(gt: Path, pred: Path, ts: tuple[float, ...], warnings: list[str]
                   ) -> dict[str, dict[str, float | int | None]]:
    """`evaluate` of a GT root of <category>/annotations.json against a root of per-category
    predictions: every GT category is scored (0 without predictions); appends to `warnings`."""
    if not pred.is_dir():
        raise InputError(f"ground truth {gt} is a root of <category>/{GT_JSON_NAME}; --pred "
                         f"must be a folder holding <category>/{PRED_JSON_NAME}, got {pred}")
    cats = sorted(p.name for p in gt.iterdir()
                  if p.is_dir() and (p / GT_JSON_NAME).is_file())
    found = [c for c in cats if (pred / c).exists()]
    if not found:
        raise InputError(f"no <category>/{PRED_JSON_NAME} under {pred} matches a category of "
                         f"{gt} ({_named(cats)})")
    missing = [c for c in cats if c not in found]
    if missing:
        warnings.append(f"no predictions for {len(missing)} categor"
                        f"{'y' if len(missing) == 1 else 'ies'}, scored 0: {_named(missing)}")
    extra = sorted(p.name for p in pred.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and p.name not in cats
                   and (p / PRED_JSON_NAME).is_file())
    if extra:
        warnings.append(f"predictions for categories not in the ground truth, not scored: "
                        f"{_named(extra)}")
    per_category: dict[str, dict[str, float | int | None]] = {}
    for c in cats:
        gcat = load_gt_json(gt / c / GT_JSON_NAME, name=c)
        if c in found:
            preds = load_predictions(pred / c, gcat)
        else:
            preds = ImagePredictions([[] for _ in gcat.images], [[] for _ in gcat.images])
        per_category[c] = evaluate_category(gcat, preds, ts)
        warnings += _unknown_warning(c, preds)
    return per_category


def _category_means(per_category: dict[str, dict[str, float | int | None]],
                    ts: tuple[float, ...]) -> dict[str, float | None]:
    """Mean over categories of each metric ("m" + AP key, and CorLoc), None where no category
    defines it."""
    mean: dict[str, float | None] = {}
    for key in [metric_key(t) for t in ts] + ["CorLoc"]:
        vals = [float(v) for r in per_category.values() if (v := r[key]) is not None]
        mkey = "CorLoc" if key == "CorLoc" else "m" + key
        mean[mkey] = round(float(np.mean(vals)), 4) if vals else None
    return mean


__all__ = [
    "DEFAULT_IOU_THRESHOLDS",
    "EvalResult",
    "GTCategory",
    "GTImage",
    "ImagePredictions",
    "average_precision",
    "corloc",
    "crowd_overlap",
    "evaluate",
    "evaluate_category",
    "load_gt_json",
    "load_gt_pngs",
    "load_predictions",
    "match_image",
    "metric_key",
]

"""Evaluation: hand-computed AP/CorLoc cases, every GT/prediction format, the CLI, real data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from coseg_cli.cli import app
from coseg_cli.coco import decode, encode_masks, mask_iou, rle_iou, to_rle
from coseg_cli.errors import ConfigError, InputError
from coseg_cli.evaluate import (
    average_precision,
    corloc,
    crowd_overlap,
    evaluate,
    match_image,
    metric_key,
)

H, W = 20, 30


def _box(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _rles(*masks: np.ndarray) -> list[dict]:
    if not masks:
        return []
    h, w = masks[0].shape
    return [to_rle(r, h, w) for r in encode_masks(np.stack(masks))]


def _seg(mask: np.ndarray) -> dict:
    return encode_masks(mask[None])[0]


# --------------------------------------------------------------------------- pure functions


def test_average_precision_hand_values():
    assert average_precision([True, True], 2) == pytest.approx(1.0)
    # FP ranked above two TPs: P = 1/2 at R = .5, 2/3 at R = 1 → envelope 2/3 everywhere.
    assert average_precision([False, True, True], 2) == pytest.approx(2 / 3)
    # TP, FP, TP: P = 1 up to R = .5, then 2/3 → .5·1 + .5·2/3.
    assert average_precision([True, False, True], 2) == pytest.approx(5 / 6)
    # Recall is over all GT: one hit of four → .25.
    assert average_precision([True], 4) == pytest.approx(0.25)
    assert average_precision([False, False], 3) == 0.0
    assert average_precision([], 3) == 0.0
    assert math.isnan(average_precision([True], 0))


def test_corloc_is_strict_and_handles_empty():
    assert corloc([0.6, 0.5, 0.0]) == pytest.approx(1 / 3)
    assert corloc([0.9, 0.51]) == 1.0
    assert math.isnan(corloc([]))


def test_rle_iou_shapes_and_values():
    a, b = _box(0, 4, 0, 10), _box(0, 2, 0, 10)
    ious = rle_iou(_rles(a, b), _rles(a))
    np.testing.assert_allclose(ious, [[1.0], [0.5]])
    assert rle_iou([], _rles(a)).shape == (0, 1)
    assert rle_iou(_rles(a), []).shape == (1, 0)
    one = np.ones((1, 1), bool)
    np.testing.assert_allclose(rle_iou(_rles(one), _rles(one)), [[1.0]])
    # crowd: intersection over the first mask's area (b is half of a; a covers all of b)
    np.testing.assert_allclose(rle_iou(_rles(a, b), _rles(b), crowd=True), [[0.5], [1.0]])


def test_rle_ious_equal_pixel_counts():
    rng = np.random.default_rng(0)
    a = rng.random((5, 17, 23)) < 0.4
    b = rng.random((4, 17, 23)) < 0.6
    inter = (a[:, None] & b[None]).sum((2, 3))
    union = (a[:, None] | b[None]).sum((2, 3))
    np.testing.assert_allclose(rle_iou(_rles(*a), _rles(*b)), inter / union, rtol=1e-12)
    # the bool-mask form used by ranking and the benchmarks is the same function
    assert np.array_equal(mask_iou(a, b), rle_iou(_rles(*a), _rles(*b)))
    ov = crowd_overlap(_rles(*a), _rles(b[0])[0])
    np.testing.assert_allclose(ov, (a & b[0]).sum((1, 2)) / a.sum((1, 2)), rtol=1e-12)


def test_match_greedy_by_score_to_highest_unmatched():
    g1, g2 = _box(0, 10, 0, 10), _box(0, 10, 12, 22)
    # The lower-scored prediction is listed first: order must come from the scores.
    preds = _rles(g2, g1, g1)
    tp, ign = match_image(preds, [0.5, 0.9, 0.8], _rles(g1, g2), 0.5)
    # g1 (0.9) takes g1; its duplicate (0.8) finds g1 taken and g2 at IoU 0 → FP.
    assert tp.tolist() == [True, True, False]
    assert not ign.any()


def test_iou_exactly_at_threshold_is_not_a_match():
    gt, pred = _box(0, 4, 0, 10), _box(0, 2, 0, 10)  # IoU = 20/40 = 0.5 exactly
    assert match_image(_rles(pred), [1.0], _rles(gt), 0.5)[0].tolist() == [False]
    assert match_image(_rles(pred), [1.0], _rles(gt), 0.25)[0].tolist() == [True]


def test_crowd_overlap_ignores_prediction_but_only_above_t():
    gt, crowd = _box(0, 10, 0, 10), _box(0, 10, 15, 30)
    on_crowd = _box(2, 8, 16, 28)  # inside the crowd region: overlap 1.0
    half = _box(0, 10, 10, 20)  # half of it on the crowd region: overlap 0.5 exactly
    crowd_rle = _rles(crowd)[0]
    tp, ign = match_image(_rles(on_crowd, half, gt), [0.9, 0.8, 0.7], _rles(gt), 0.5, crowd_rle)
    assert tp.tolist() == [False, False, True]
    assert ign.tolist() == [True, False, False]


def test_metric_key_names():
    assert [metric_key(t) for t in (0.25, 0.5, 0.75, 0.3)] == ["AP25", "AP50", "AP75", "AP30"]


# --------------------------------------------------------------------------- file fixtures

GT_MASKS = {  # stem → non-crowd instances, crowd region or None
    "a": ([_box(1, 9, 1, 9), _box(10, 19, 12, 25)], None),
    "b": ([_box(0, 6, 0, 6), _box(0, 6, 8, 14), _box(12, 20, 20, 30)], _box(10, 20, 0, 10)),
    "c": ([_box(5, 15, 5, 25)], None),
}


def _polygon(mask: np.ndarray) -> list[list[float]]:
    """A box mask as a COCO polygon rasterising to exactly that box (pycocotools convention)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0),
             float(y1)]]


def _write_gt_json(path: Path, name: str = "blob") -> Path:
    images, anns = [], []
    for i, (stem, (inst, crowd)) in enumerate(GT_MASKS.items(), start=1):
        images.append({"id": i, "file_name": f"{stem}.jpg", "height": H, "width": W})
        for k, m in enumerate(inst):
            if k == 0:
                seg = _polygon(m)  # polygons …
                assert decode(to_rle(seg, H, W)).sum() == m.sum()
            elif k == 1:
                seg = _seg(m)  # … compressed RLE …
            else:  # … and uncompressed RLE
                flat = m.T.reshape(-1).astype(np.uint8)
                edges = np.flatnonzero(np.diff(np.concatenate(([0], flat))) != 0)
                counts = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
                seg = {"size": [H, W], "counts": counts}
                assert decode(to_rle(seg, H, W)).sum() == m.sum()
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1,
                         "segmentation": seg, "iscrowd": 0})
        if crowd is not None:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1,
                         "segmentation": _seg(crowd), "iscrowd": 1})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": name}]}))
    return path


def _write_gt_pngs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (inst, crowd) in GT_MASKS.items():
        ids = np.zeros((H, W), np.uint8)
        for k, m in enumerate(inst, start=1):
            ids[m] = k
        if crowd is not None:
            ids[crowd] = 255
        Image.fromarray(ids).save(folder / f"{stem}.png")
    return folder


def _pred_items() -> list[tuple[str, np.ndarray, float]]:
    """Deterministic imperfect predictions: hits, shifted boxes, a crowd hit, a miss."""
    (a1, a2), _ = GT_MASKS["a"]
    (b1, _b2, b3), _crowd_b = GT_MASKS["b"]
    (c1,), _ = GT_MASKS["c"]
    return [
        ("a", np.roll(a1, 2, axis=1), 0.9),  # IoU 48/80 = .6
        ("a", a2, 0.4),
        ("a", _box(0, 5, 20, 30), 0.95),  # miss, ranked first
        ("b", b1, 0.8),
        ("b", b1, 0.7),  # duplicate
        ("b", _box(12, 18, 2, 8), 0.85),  # on crowd
        ("b", np.roll(b3, 3, axis=0), 0.3),
        ("c", np.roll(c1, 4, axis=1), 0.6),  # IoU 160/240
    ]


def _write_pred_dataset(path: Path, items=None, *, sizes=None) -> Path:
    items = _pred_items() if items is None else items
    stems = list(dict.fromkeys(s for s, _, _ in items))
    images = [{"id": 100 + i, "file_name": f"{s}.jpg", "height": H, "width": W}
              for i, s in enumerate(stems)]
    if sizes:
        for im in images:
            im["height"], im["width"] = sizes.get(im["file_name"], (H, W))
    anns = [{"id": n + 1, "image_id": 100 + stems.index(s), "category_id": 1,
             "segmentation": _seg(m), "score": sc} for n, (s, m, sc) in enumerate(items)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "blob"}]}))
    return path


def _write_pred_results(path: Path) -> Path:
    ids = {stem: i for i, stem in enumerate(GT_MASKS, start=1)}  # the GT JSON's ids
    path.write_text(json.dumps([{"image_id": ids[s], "category_id": 1, "segmentation": _seg(m),
                                 "score": sc} for s, m, sc in _pred_items()]))
    return path


# --------------------------------------------------------------------------- evaluate()


def test_hand_computed_dataset(tmp_path):
    gt = _write_gt_json(tmp_path / "gt.json")
    pred = _write_pred_dataset(tmp_path / "pred.json")
    ious = {  # the shifted masks' IoUs, computed by hand
        "a1": 48 / 80,  # 8x8 box shifted 2 px: 8·6 / (64+64−48)
        "c1": 160 / 240,  # 10x20 box shifted 4 px: 10·16 / (200+200−160)
        "b3": 50 / 110,  # 8x10 box rolled 3 px down (wraps to the top): 5·10 / (80+80−50)
    }
    (_b1, _b2, b3), _ = GT_MASKS["b"]
    assert rle_iou(_rles(np.roll(b3, 3, axis=0)), _rles(b3))[0, 0] == pytest.approx(ious["b3"])
    r = evaluate(gt, pred).to_json()
    cat = r["per_category"]["blob"]
    assert (cat["n_images"], cat["n_gt"], cat["n_pred"]) == (3, 6, 8)
    # Pooled order (crowd prediction .85 ignored at every t, duplicate .7 always FP):
    #  t=.25: F .95, T .9, T .8, F .7, T .6, T .4, T .3 → P/R steps below.
    def ap(flags):
        return 100 * average_precision(flags, 6)
    assert cat["AP25"] == pytest.approx(ap([0, 1, 1, 0, 1, 1, 1]), abs=1e-3)
    #  t=.5: a1 .6 T, c1 .667 T, b3 .4545 F.
    assert cat["AP50"] == pytest.approx(ap([0, 1, 1, 0, 1, 1, 0]), abs=1e-3)
    #  t=.75: only exact masks b1 (.8) and a2 (.4).
    assert cat["AP75"] == pytest.approx(ap([0, 0, 1, 0, 0, 1, 0]), abs=1e-3)
    # The hand values themselves: t=.25 precisions at each TP 1/2, 2/3, 3/5, 4/6, 5/7.
    assert ap([0, 1, 1, 0, 1, 1, 1]) == pytest.approx(
        100 * (5 / 7) * (5 / 6), abs=1e-9)  # envelope is 5/7 for every recall step
    # CorLoc: a's top (.95) misses; b's top on-crowd (.85) is skipped → b1 hits; c hits (.667).
    assert cat["CorLoc"] == pytest.approx(200 / 3, abs=1e-3)
    assert r["mean"] == {"mAP25": cat["AP25"], "mAP50": cat["AP50"], "mAP75": cat["AP75"],
                         "CorLoc": cat["CorLoc"]}


def test_perfect_predictions_score_100(tmp_path):
    gt = _write_gt_json(tmp_path / "gt.json")
    items = [(s, m, 1.0 - 0.01 * k) for s, (inst, _) in GT_MASKS.items()
             for k, m in enumerate(inst)]
    r = evaluate(gt, _write_pred_dataset(tmp_path / "pred.json", items))
    assert r.to_json()["mean"] == {"mAP25": 100.0, "mAP50": 100.0, "mAP75": 100.0,
                                   "CorLoc": 100.0}


def test_crowd_prediction_ranked_first_is_ignored(tmp_path):
    gt = _write_gt_json(tmp_path / "gt.json")
    (b1, b2, b3), crowd = GT_MASKS["b"]
    items = [("b", crowd, 0.99), ("b", b1, 0.9), ("b", b2, 0.8), ("b", b3, 0.7)]
    cat = evaluate(gt, _write_pred_dataset(tmp_path / "p.json", items)).per_category["blob"]
    # 3 of 6 GT found with precision 1 (crowd hit neither TP nor FP) → AP 50; CorLoc: b only.
    assert cat["AP50"] == pytest.approx(50.0)
    assert cat["CorLoc"] == pytest.approx(100 / 3, abs=1e-3)


def test_empty_predictions_give_zero(tmp_path):
    gt = _write_gt_json(tmp_path / "gt.json")
    for pred in (_write_pred_dataset(tmp_path / "empty.json", []),
                 tmp_path / "results.json"):
        if pred.name == "results.json":
            pred.write_text("[]")
        r = evaluate(gt, pred)
        assert r.per_category["blob"]["n_pred"] == 0
        assert r.to_json()["mean"] == {"mAP25": 0.0, "mAP50": 0.0, "mAP75": 0.0, "CorLoc": 0.0}


def test_gt_json_and_png_folder_agree(tmp_path):
    gt_json = _write_gt_json(tmp_path / "blob" / "annotations.json")
    gt_png = _write_gt_pngs(tmp_path / "blob" / "masks")
    pred = _write_pred_dataset(tmp_path / "pred.json")
    a = evaluate(gt_json, pred).to_json()
    b = evaluate(gt_png, pred).to_json()
    assert a == b
    assert a["per_category"]["blob"]["AP25"] > 0  # not trivially equal
    # The category folder itself resolves to its annotations.json.
    assert evaluate(tmp_path / "blob", pred).to_json() == a


def test_results_list_and_dataset_dict_agree(tmp_path):
    gt = _write_gt_json(tmp_path / "gt.json")
    a = evaluate(gt, _write_pred_dataset(tmp_path / "pred.json")).to_json()
    b = evaluate(gt, _write_pred_results(tmp_path / "results.json")).to_json()
    assert a == b


def test_run_folder_and_custom_thresholds(tmp_path):
    gt = _write_gt_json(tmp_path / "gt.json")
    _write_pred_dataset(tmp_path / "run" / "instances.json")
    r = evaluate(gt, tmp_path / "run", iou_thresholds=(0.3, 0.9))
    assert set(r.per_category["blob"]) == {"AP30", "AP90", "CorLoc", "n_images", "n_gt",
                                           "n_pred"}
    assert set(r.mean) == {"mAP30", "mAP90", "CorLoc"}
    with pytest.raises(ConfigError):
        evaluate(gt, tmp_path / "run", iou_thresholds=(1.5,))
    with pytest.raises(ConfigError):
        evaluate(gt, tmp_path / "run", iou_thresholds=(0.5, 0.501))


def test_unknown_images_are_counted_and_warned(tmp_path):
    gt = _write_gt_json(tmp_path / "gt.json")
    items = [*_pred_items(), ("zzz", _box(0, 5, 0, 5), 0.99), ("zzz", _box(0, 5, 5, 9), 0.98)]
    r = evaluate(gt, _write_pred_dataset(tmp_path / "pred.json", items))
    ref = evaluate(gt, _write_pred_dataset(tmp_path / "ref.json"))
    assert r.per_category == ref.per_category
    assert len(r.warnings) == 1 and "2 prediction(s)" in r.warnings[0]
    assert "zzz.jpg" in r.warnings[0]


def test_size_mismatch_names_the_image(tmp_path):
    gt = _write_gt_json(tmp_path / "gt.json")
    items = [("c", _box(0, 5, 0, 5, h=H + 1), 0.5)]
    with pytest.raises(InputError, match=r"c\.jpg"):
        evaluate(gt, _write_pred_dataset(tmp_path / "p.json", items))
    with pytest.raises(InputError, match=r"c\.jpg"):  # the image entry's own size
        evaluate(gt, _write_pred_dataset(tmp_path / "q.json", [("c", _box(0, 5, 0, 5), 0.5)],
                                         sizes={"c.jpg": (H, W + 2)}))


def test_bad_inputs_raise_input_error(tmp_path):
    gt = _write_gt_json(tmp_path / "gt.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        evaluate(gt, tmp_path / "bad.json")
    with pytest.raises(InputError, match="not found"):
        evaluate(tmp_path / "nope.json", gt)
    no_score = json.loads(_write_pred_dataset(tmp_path / "p.json").read_text())
    del no_score["annotations"][0]["score"]
    (tmp_path / "p.json").write_text(json.dumps(no_score))
    with pytest.raises(InputError, match="score"):
        evaluate(gt, tmp_path / "p.json")
    with pytest.raises(InputError, match="image ids"):  # results list against PNG GT
        evaluate(_write_gt_pngs(tmp_path / "png"), _write_pred_results(tmp_path / "r.json"))


def test_root_layout_with_missing_category(tmp_path):
    _write_gt_json(tmp_path / "gt" / "one" / "annotations.json", name="x")
    _write_gt_json(tmp_path / "gt" / "two" / "annotations.json", name="y")
    _write_pred_dataset(tmp_path / "pred" / "one" / "instances.json")
    r = evaluate(tmp_path / "gt", tmp_path / "pred")
    assert list(r.per_category) == ["one", "two"]
    assert r.per_category["two"]["AP50"] == 0.0 and r.per_category["two"]["n_pred"] == 0
    assert r.mean["mAP50"] == pytest.approx(r.per_category["one"]["AP50"] / 2, abs=1e-3)
    assert any("two" in w for w in r.warnings)
    with pytest.raises(InputError, match="matches a category"):
        evaluate(tmp_path / "gt", tmp_path)


# --------------------------------------------------------------------------- CLI


def _one_error_line(res) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert res.stdout == ""
    return lines[0]


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    gt = _write_gt_json(tmp_path / "gt.json")
    line = _one_error_line(runner.invoke(app, ["eval", "--gt", str(tmp_path / "missing.json"),
                                               "--pred", str(gt)]))
    assert "missing.json" in line
    (tmp_path / "bad.json").write_text("[1, 2,")
    line = _one_error_line(runner.invoke(app, ["eval", "--gt", str(gt), "--pred",
                                               str(tmp_path / "bad.json")]))
    assert "bad.json" in line and "JSON" in line
    big = _write_pred_dataset(tmp_path / "big.json", [("a", _box(0, 5, 0, 5, w=W + 3), 0.5)])
    line = _one_error_line(runner.invoke(app, ["eval", "--gt", str(gt), "--pred", str(big)]))
    assert "a.jpg" in line
    line = _one_error_line(runner.invoke(app, ["eval", "--gt", str(gt), "--pred", str(big),
                                               "--iou", "1.0"]))
    assert "[0, 1)" in line
    assert runner.invoke(app, ["eval"]).exit_code == 2  # --gt is required


def test_cli_json_and_table(tmp_path, monkeypatch):
    runner = CliRunner()
    gt = _write_gt_json(tmp_path / "gt.json")
    _write_pred_dataset(tmp_path / "masks" / "instances.json")
    monkeypatch.chdir(tmp_path / "masks")  # --pred defaults to ./instances.json
    res = runner.invoke(app, ["eval", "--gt", str(gt), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data == evaluate(gt, tmp_path / "masks" / "instances.json").to_json()
    assert list(data) == ["per_category", "mean"]
    res = runner.invoke(app, ["eval", "--gt", str(gt), "--iou", "0.3"])
    assert res.exit_code == 0, res.output
    assert "AP30" in res.stdout and "mean" in res.stdout and "AP50" not in res.stdout


def test_cli_warnings_go_to_stderr(tmp_path):
    gt = _write_gt_json(tmp_path / "gt.json")
    pred = _write_pred_dataset(tmp_path / "p.json", [("zzz", _box(0, 5, 0, 5), 0.5)])
    res = CliRunner().invoke(app, ["eval", "--gt", str(gt), "--pred", str(pred), "--json"])
    assert res.exit_code == 0
    assert json.loads(res.stdout)["mean"]["mAP50"] == 0.0
    assert "warning:" in res.stderr and "zzz.jpg" in res.stderr


# --------------------------------------------------------------------------- real data


def _gt_as_predictions(ann_file: Path, out: Path) -> Path:
    data = json.loads(ann_file.read_text())
    for k, ann in enumerate(data["annotations"]):
        ann["score"] = 1.0 - 1e-4 * k  # crowd annotations included: they must be ignored
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data))
    return out


@pytest.mark.slow
def test_real_category_self_eval_is_100(coco_dev, tmp_path):
    cat = "person"  # 132 images, crowd regions included
    pred = _gt_as_predictions(coco_dev / cat / "annotations.json", tmp_path / "instances.json")
    res = CliRunner().invoke(app, ["eval", "--gt", str(coco_dev / cat / "annotations.json"),
                                   "--pred", str(pred), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["per_category"][cat] | {"n_images": 0, "n_gt": 0, "n_pred": 0} == {
        "AP25": 100.0, "AP50": 100.0, "AP75": 100.0, "CorLoc": 100.0,
        "n_images": 0, "n_gt": 0, "n_pred": 0}
    assert data["per_category"][cat]["n_images"] == 132
    assert data["mean"] == {"mAP25": 100.0, "mAP50": 100.0, "mAP75": 100.0, "CorLoc": 100.0}


@pytest.mark.slow
def test_real_root_self_eval_is_100(coco_dev, tmp_path):
    cats = sorted(p.name for p in coco_dev.iterdir() if (p / "annotations.json").is_file())
    for c in cats:
        _gt_as_predictions(coco_dev / c / "annotations.json", tmp_path / c / "instances.json")
    res = CliRunner().invoke(app, ["eval", "--gt", str(coco_dev), "--pred", str(tmp_path),
                                   "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert sorted(data["per_category"]) == cats and len(cats) == 37
    for c, r in data["per_category"].items():
        assert (r["AP25"], r["AP50"], r["AP75"], r["CorLoc"]) == (100.0,) * 4, c
    assert data["mean"] == {"mAP25": 100.0, "mAP50": 100.0, "mAP75": 100.0, "CorLoc": 100.0}
    assert res.stderr == ""

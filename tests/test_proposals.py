"""Mask proposals: shapes, determinism, blob recovery, filters, edge images, COCO round trip,
CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import blob_image
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

from coseg_cli import coco
from coseg_cli.cli import app
from coseg_cli.config import CosegConfig
from coseg_cli.errors import ConfigError
from coseg_cli.proposals import (
    METHODS,
    _Candidates,
    generate_proposals,
    get_method,
    proposals_to_coco,
)
from coseg_cli.records import ProposalSet


def _proposals(image: np.ndarray, prior: np.ndarray | None = None, **fields: Any) -> ProposalSet:
    """generate_proposals with the default config, `fields` replaced."""
    return generate_proposals(image, CosegConfig(**fields), prior=prior)


def _discs(size: int) -> list[np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    return [(yy - size * cy) ** 2 + (xx - size * cx) ** 2 <= (size * 0.14) ** 2
            for cy, cx in ((0.3, 0.3), (0.7, 0.68))]


def _iou(masks: np.ndarray, gt: np.ndarray) -> np.ndarray:
    inter = (masks & gt).reshape(len(masks), -1).sum(1)
    union = (masks | gt).reshape(len(masks), -1).sum(1)
    return inter / np.maximum(union, 1)


def _pairwise_iou(masks: np.ndarray) -> np.ndarray:
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(1)
    return inter / (area[:, None] + area[None] - inter)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shapes_dtypes_and_order(method: str) -> None:
    img = blob_image(64)
    props = _proposals(img, proposal_method=method, max_proposals=50)
    assert props.masks.dtype == bool and props.masks.shape[1:] == (64, 64)
    assert props.scores.dtype == np.float32 and props.scores.shape == (len(props),)
    assert 0 < len(props) <= 50 and len(props.sources) == len(props)
    assert np.all(np.isfinite(props.scores)) and np.all(np.diff(props.scores) <= 0)


def test_deterministic() -> None:
    img = blob_image(80, seed=3)
    a = _proposals(img, max_proposals=100)
    b = _proposals(img, max_proposals=100)
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.scores, b.scores)


def test_recovers_each_blob() -> None:
    img = blob_image(96)
    props = _proposals(img, max_proposals=200)
    for disc in _discs(96):
        assert _iou(props.masks, disc).max() > 0.9


def test_area_filter_and_dedup() -> None:
    rng = np.random.default_rng(0)
    img = (rng.random((48, 64, 3)) * 60 + blob_image(64)[:48] * 0.7).astype(np.uint8)
    props = _proposals(img, max_proposals=300, min_area_frac=0.01, max_area_frac=0.5)
    assert len(props) > 0
    frac = props.masks.reshape(len(props), -1).mean(1)
    assert frac.min() >= 0.01 - 1e-9 and frac.max() <= 0.5 + 1e-9
    iou = _pairwise_iou(props.masks)
    np.fill_diagonal(iou, 0)
    assert iou.max() <= 0.95


def test_cap_resolution_maps_back() -> None:
    img = np.kron(blob_image(64), np.ones((4, 4, 1), np.uint8))  # 256×256
    props = _proposals(img, max_proposals=100, work_max_side=128)
    assert props.masks.shape[1:] == (256, 256)
    for disc in _discs(64):
        assert _iou(props.masks, np.kron(disc, np.ones((4, 4), bool))).max() > 0.9


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 2, 3), (2000, 20, 3), (40, 50)])
def test_edge_images(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    props = _proposals(img, max_proposals=20)
    assert props.masks.shape == (len(props), shape[0], shape[1])
    assert len(props) <= 20


def test_prior_adds_saliency_candidates() -> None:
    img = blob_image(64)
    prior = np.zeros((64, 64), np.float32)
    for disc in _discs(64):
        prior[disc] = 1.0
    props = _proposals(img, prior, max_proposals=100)
    assert "saliency" in props.sources or len(props) > 0
    for disc in _discs(64):
        assert _iou(props.masks, disc).max() > 0.9
    with pytest.raises(ConfigError):
        _proposals(img, np.zeros((3, 3), np.float32))


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="hierarchical"):
        get_method("mcg")
    with pytest.raises(ConfigError, match="hierarchical"):
        _proposals(blob_image(32), proposal_method="mcg")
    with pytest.raises(ConfigError, match="max_proposals"):
        CosegConfig(max_proposals=0)  # the config checks its fields, the stage only reads them
    with pytest.raises(ConfigError):
        _proposals(np.zeros((8, 8, 3), np.float32))


def test_coco_round_trip(tmp_path: Path) -> None:
    sets = [_proposals(blob_image(64), max_proposals=30),
            _proposals(blob_image(48, seed=2)[:, :40], max_proposals=30)]
    recs = [SimpleNamespace(name="a.png", height=64, width=64),
            SimpleNamespace(name="sub/b.png", height=48, width=40)]
    data = proposals_to_coco(recs, sets)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    api = COCO(str(path))
    assert sorted(api.getImgIds()) == [1, 2]
    for img_id, props in zip((1, 2), sets):
        anns = api.loadAnns(api.getAnnIds(imgIds=[img_id]))
        assert len(anns) == len(props)
        for ann, mask, score in zip(anns, props.masks, props.scores):
            assert np.array_equal(api.annToMask(ann).astype(bool), mask)
            assert ann["area"] == int(mask.sum()) and ann["bbox"] == coco.bbox_xywh(mask)
            assert ann["score"] == pytest.approx(float(score))


def test_cli_writes_proposals_json(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    Image.fromarray(blob_image(64)).save(src / "one.png")
    Image.fromarray(blob_image(56, seed=1)).save(src / "two.png")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["proposals", str(src), "--out", str(out), "--max-proposals",
                                 "25", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["images"] == 2 and 0 < summary["proposals"] <= 50
    data = json.loads((out / "proposals.json").read_text())
    assert [im["file_name"] for im in data["images"]] == ["one.png", "two.png"]
    assert len(data["annotations"]) == summary["proposals"]
    r = CliRunner().invoke(app, ["proposals", str(src), "--out", str(out), "--method", "nope"])
    assert r.exit_code == 2 and "hierarchical" in r.output


@pytest.mark.parametrize("high", [1, 50, 5000, 1 << 40])
def test_dense_unique_matches_np_unique(high: int) -> None:
    """The table-based unique behind the atom overlay equals np.unique, including the sort it
    falls back to when the values are too large (1 << 40) or sparse for a table (5000 over 300
    values)."""
    from coseg_cli import proposals

    rng = np.random.default_rng(high % 97)
    for n in (0, 1, 300, 20000):
        values = rng.integers(0, high, n, dtype=np.int64)
        uniq, inv = proposals._dense_unique(values)
        ref_uniq, ref_inv = np.unique(values, return_inverse=True)
        assert np.array_equal(uniq, ref_uniq) and np.array_equal(inv, ref_inv.ravel())
        assert inv.dtype == np.int64


def test_proposal_set_paints_what_its_atoms_hold() -> None:
    """Masks → atoms → masks is the identity; `paint` picks rows in the order asked; pixels with
    the same membership share one atom."""
    rng = np.random.default_rng(5)
    masks = np.zeros((4, 20, 30), bool)
    for k in range(4):
        r, c = rng.integers(0, 12, 2)
        masks[k, r:r + 8, c:c + 15] = True
    props = ProposalSet.from_masks(masks, scores=np.arange(4.0))
    assert np.array_equal(props.masks, masks) and len(props) == 4
    assert np.array_equal(props.paint(np.array([2, 0])), masks[[2, 0]])
    assert props.members.shape[1] == len(np.unique(masks.reshape(4, -1), axis=1).T)
    assert props.paint(np.zeros(0, np.int64)).shape == (0, 20, 30)


def test_generated_proposals_paint_at_the_image_size() -> None:
    """The atom map is mapped back to the input's size when grouping ran smaller."""
    img = blob_image(200, seed=2)
    props = generate_proposals(img, CosegConfig(max_proposals=30, work_max_side=100))
    assert props.atom_map.shape == (200, 200) and props.atom_map.dtype == np.int32
    assert len(props) > 0 and props.members.shape[0] == len(props)
    assert props.members.shape[1] >= int(props.atom_map.max()) + 1  # nearest may drop atoms
    assert props.masks.shape == (len(props), 200, 200)


def test_member_rows_are_the_candidates_atoms_in_the_order_asked() -> None:
    """The sparse region → atom expansion equals indexing the dense membership, in any order
    across parts, and comes back canonical (what the near-duplicate IoUs sum over)."""
    rng = np.random.default_rng(7)
    num_atoms = 30
    parts = [(rng.random((5, 8)) < 0.4, rng.integers(0, 8, num_atoms)),
             (rng.random((4, num_atoms)) < 0.3, np.arange(num_atoms))]
    n = 9
    cand = _Candidates(parts, np.zeros(n, np.float32), np.zeros((n, 4), np.float32),
                       np.zeros(n, np.float32), ["x"] * n)
    dense = np.concatenate([m[:, lookup] for m, lookup in parts])
    idx = np.array([7, 0, 4, 8, 2, 5])
    rows = cand.member_rows(idx)
    assert rows.has_canonical_format and rows.dtype == np.float32
    assert np.array_equal(rows.toarray() > 0, dense[idx]) and set(rows.data.tolist()) <= {1.0}
    assert cand.member_rows(np.zeros(0, np.int64)).shape == (0, num_atoms)

"""ranking: eq. 7 by hand, batch vs per-peak, contour band counts, NMS boundaries, noise filter."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from coseg_cli.coco import mask_iou
from coseg_cli.config import CosegConfig
from coseg_cli.ranking import (
    contour_band,
    noise_filter,
    noise_threshold,
    score_proposals_batch,
    select_instances,
)

# eq. 7's β, γ and contour band as the config holds them (the paper's: 0.8, 1e-5, 5×5)
PAPER = {"beta": CosegConfig.rank_beta, "gamma": CosegConfig.rank_gamma,
         "contour_px": CosegConfig.contour_px}


def _score_one(instance_map: np.ndarray, cosal: np.ndarray, masks: np.ndarray,
               **kw: Any) -> np.ndarray:
    """Eq. 7 for one peak (K = 1), PAPER unless `kw` says otherwise: float32[N]."""
    return score_proposals_batch(np.asarray(instance_map)[None], cosal, masks,
                                 **{**PAPER, **kw})[0]


def _square(h: int, w: int, r0: int, c0: int, side: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[r0:r0 + side, c0:c0 + side] = True
    return m


# ---------------------------------------------------------------- contour band

def test_contour_band_square_hand_count() -> None:
    # 6×6 square in the middle of 20×20: dilate 5×5 → 10×10, erode 5×5 → 2×2; band = 100 − 4
    m = _square(20, 20, 7, 7, 6)[None]
    band = contour_band(m, 5)
    assert band.dtype == bool and band.shape == m.shape
    assert band.sum() == 96
    assert not band[0, 9:11, 9:11].any()  # the eroded core
    assert band[0, 5, 5] and band[0, 14, 14] and not band[0, 4, 4]
    # 3×3 element: dilate → 8×8, erode → 4×4
    assert contour_band(m, 3).sum() == 64 - 16
    assert contour_band(m, 1).sum() == 0


def test_contour_band_border_and_empty() -> None:
    # a square in the corner: outside the image is foreground for erosion (MATLAB/OpenCV rule)
    m = _square(10, 10, 0, 0, 4)[None]
    band = contour_band(m, 3)
    # dilate → 5×5 (clipped), erode → 3×3 (no shrink at the border); band = 25 − 9
    assert band.sum() == 16
    assert contour_band(np.zeros((0, 5, 5), bool), 5).shape == (0, 5, 5)
    assert contour_band(np.ones((1, 1, 1), bool), 5).sum() == 0
    assert contour_band(np.zeros((2, 1, 1), bool), 5).sum() == 0


@pytest.mark.parametrize("px", [2, 3, 5, 6])
def test_contour_band_equals_full_image_morphology(px: int) -> None:
    # the bounding-box crop inside contour_band must not change the result (even px included)
    import cv2

    rng = np.random.default_rng(px)
    masks = np.zeros((30, 20, 25), bool)
    for i in range(30):
        y, x = rng.integers(0, 20), rng.integers(0, 25)
        hh, ww = rng.integers(1, 12, size=2)
        masks[i, y:y + hh, x:x + ww] = True
        masks[i] &= rng.random((20, 25)) > 0.2
    kernel = np.ones((px, px), np.uint8)
    want = np.stack([cv2.dilate(m, kernel) != cv2.erode(m, kernel) for m in masks.view(np.uint8)])
    np.testing.assert_array_equal(contour_band(masks, px), want)


# ---------------------------------------------------------------- eq. 7

def test_score_hand_computed() -> None:
    # 8×8, O = 1 on the left half, 0 on the right; S = 0.5 everywhere
    h = w = 8
    o = np.zeros((h, w), np.float32)
    o[:, :4] = 1.0
    s = np.full((h, w), 0.5, np.float32)
    p = _square(h, w, 2, 2, 3)  # rows 2..4, cols 2..4
    band = contour_band(p[None], 3)[0]  # dilate rows/cols 1..5 (25), erode → (3,3) only (1)
    assert band.sum() == 24
    # inside: 6 cells with O=1 (cols 2,3), each O·S = 0.5 → 3.0
    # band: cols 1..3 of rows 1..5 minus centre (3,3) → 15 − 1 = 14 cells with O=1 → 7.0
    # background: 9 cells · 0.5 = 4.5
    beta, gamma = 0.8, 0.1
    want = beta * 3.0 + 7.0 - gamma * 4.5
    got = _score_one(o, s, p[None], beta=beta, gamma=gamma, contour_px=3)
    assert got.dtype == np.float32 and got.shape == (1,)
    assert got[0] == pytest.approx(want, rel=1e-6)
    # the config's defaults are the paper's β = 0.8, γ = 1e-5, 5×5 band
    band5 = contour_band(p[None], 5)[0]
    want5 = 0.8 * 3.0 + (o * s)[band5].sum() - 1e-5 * 4.5
    assert _score_one(o, s, p[None])[0] == pytest.approx(want5, rel=1e-6)


def test_batch_equals_per_peak_and_bands_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    k, n, h, w = 4, 9, 24, 30
    maps = rng.random((k, h, w)).astype(np.float32)
    cosal = rng.random((h, w)).astype(np.float32)
    masks = rng.random((n, h, w)) > 0.6
    masks[0] = False  # an empty proposal
    # small blocks so the chunking over masks is exercised
    monkeypatch.setattr("coseg_cli.ranking._BLOCK_ELEMS", 2 * h * w)
    batch = score_proposals_batch(maps, cosal, masks, **PAPER)
    assert batch.shape == (k, n) and batch.dtype == np.float32
    bands = contour_band(masks, 5)
    for i in range(k):
        single = _score_one(maps[i], cosal, masks, bands=bands)
        np.testing.assert_allclose(batch[i], single, rtol=1e-5)
        # direct eq. 7 with boolean indexing
        os_ = maps[i] * cosal
        direct = [0.8 * os_[m].sum() + os_[b].sum() - 1e-5 * (1 - cosal)[m].sum()
                  for m, b in zip(masks, bands, strict=True)]
        np.testing.assert_allclose(batch[i], direct, rtol=1e-4, atol=1e-6)
    assert batch[0, 0] == 0.0


def test_score_one_pixel_image_and_full_rows() -> None:
    # (1,1) image: the mask is the whole image; the band is empty (border is foreground)
    got = _score_one(np.array([[2.0]]), np.array([[0.25]]), np.ones((1, 1, 1), bool),
                     beta=1.0, gamma=1.0)
    assert got[0] == pytest.approx(2.0 * 0.25 - 0.75)
    # full-width rows: runs that start at column 0 and end at the last column
    masks = np.zeros((2, 3, 4), bool)
    masks[0, 1] = True
    masks[1] = True
    o = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = _score_one(o, np.ones((3, 4), np.float32), masks, beta=1.0, contour_px=1)
    np.testing.assert_allclose(got, [o[1].sum(), o.sum()])


def test_score_empty_and_shape_checks() -> None:
    cosal = np.zeros((5, 6), np.float32)
    assert score_proposals_batch(np.zeros((0, 5, 6)), cosal, np.zeros((3, 5, 6), bool),
                                 **PAPER).shape == (0, 3)
    assert score_proposals_batch(np.zeros((2, 5, 6)), cosal, np.zeros((0, 5, 6), bool),
                                 **PAPER).shape == (2, 0)
    with pytest.raises(ValueError):
        score_proposals_batch(np.zeros((2, 5, 7)), cosal, np.zeros((3, 5, 6), bool), **PAPER)
    with pytest.raises(ValueError):
        _score_one(np.zeros((5, 6)), cosal, np.zeros((2, 5, 6), bool),
                   bands=np.zeros((1, 5, 6), bool))


# ---------------------------------------------------------------- NMS

def test_mask_iou_exact() -> None:
    a = np.zeros((1, 1, 5), bool)
    b = np.zeros((1, 1, 5), bool)
    a[0, 0, :3] = True
    b[0, 0, 1:4] = True  # inter 2, union 4
    assert mask_iou(a, b)[0, 0] == 0.5
    assert mask_iou(a, np.zeros((0, 1, 5), bool)).shape == (1, 0)
    # (1,1) masks; two empty masks have IoU 0 (NMS then keeps both)
    one, empty = np.ones((1, 1, 1), bool), np.zeros((1, 1, 1), bool)
    assert mask_iou(one, one)[0, 0] == 1.0 and mask_iou(empty, empty)[0, 0] == 0.0
    # the same numbers as counting pixels
    rng = np.random.default_rng(1)
    x, y = rng.random((6, 9, 7)) < 0.5, rng.random((3, 9, 7)) < 0.3
    inter = (x[:, None] & y[None]).sum((2, 3))
    np.testing.assert_allclose(mask_iou(x, y), inter / (x[:, None] | y[None]).sum((2, 3)),
                               rtol=1e-12)


def test_select_instances_hand_case() -> None:
    # 1×10 strips; IoU(A,B) = 2/5 = 0.4 exactly (suppressed: keep needs IoU < 0.4);
    # IoU(A,C) = 1/7 (kept); D disjoint
    masks = np.zeros((4, 1, 10), bool)
    masks[0, 0, 0:4] = True   # A = cols 0..3
    masks[1, 0, 2:5] = True   # B = cols 2..4: inter A = 2, union = 5 → 0.4
    masks[2, 0, 3:7] = True   # C = cols 3..6: inter A = 1, union = 7 → 1/7; inter B = 2 → 2/5
    masks[3, 0, 8:10] = True  # D
    iou = mask_iou(masks, masks)
    assert iou[0, 1] == 0.4 and iou[1, 2] == 0.4
    scores = np.array([
        [9.0, 1.0, 0.0, 0.0],   # peak 0 → A (9)
        [0.0, 8.0, 0.0, 0.0],   # peak 1 → B (8): IoU with A = 0.4 → suppressed
        [0.0, 0.0, 7.0, 0.0],   # peak 2 → C (7): IoU with A = 1/7 → kept (B was dropped)
        [8.5, 0.0, 0.0, 0.0],   # peak 3 → A again (8.5): IoU 1 → suppressed
        [0.0, 0.0, 0.0, 1.0],   # peak 4 → D (1): disjoint → kept
    ], np.float32)
    out = select_instances(scores, masks, nms_iou_thresh=0.4)
    assert out == [(0, 0, 9.0), (2, 2, 7.0), (4, 3, 1.0)]
    # a looser threshold keeps B too (0.4 < 0.5), but C now overlaps B at 0.4 < 0.5 → kept
    out = select_instances(scores, masks, nms_iou_thresh=0.5)
    assert [k for k, _, _ in out] == [0, 1, 2, 4]
    # thresh 1.0: only the exact duplicate (peak 3, IoU 1 with A) goes
    assert [k for k, _, _ in select_instances(scores, masks, nms_iou_thresh=1.0)] == [0, 1, 2, 4]


def test_select_instances_empty_and_ties() -> None:
    masks = np.zeros((2, 3, 3), bool)
    assert select_instances(np.zeros((0, 2), np.float32), masks, nms_iou_thresh=0.4) == []
    assert select_instances(np.zeros((3, 0), np.float32), np.zeros((0, 3, 3), bool),
                            nms_iou_thresh=0.4) == []
    # tie inside a row → lowest proposal index; two empty proposals have IoU 0 → both kept
    out = select_instances(np.array([[1.0, 1.0], [0.5, 2.0]], np.float32), masks,
                           nms_iou_thresh=0.4)
    assert out == [(1, 1, 2.0), (0, 0, 1.0)]
    with pytest.raises(ValueError):
        select_instances(np.zeros((1, 3), np.float32), masks, nms_iou_thresh=0.4)


# ---------------------------------------------------------------- noise filter

def test_noise_filter_percentile_and_emptied_image() -> None:
    scores = [np.array([10.0, 9.0, 1.0]), np.array([0.5, 0.2]), np.array([]), np.array([8.0])]
    # all 6 scores sorted: 0.2 0.5 1 8 9 10; MATLAB prctile 50 (hazen) = (1 + 8) / 2 = 4.5
    keep = noise_filter(scores, 50.0)
    assert [k.tolist() for k in keep] == [[True, True, False], [True, False], [], [True]]
    # 20th percentile (hazen): position 6·0.2 − 0.5 = 0.7 → 0.2 + 0.7·(0.5 − 0.2) = 0.41
    keep = noise_filter(scores, 20.0)
    assert [k.tolist() for k in keep] == [[True, True, True], [True, False], [], [True]]
    assert noise_filter([], 20.0) == []
    assert [k.tolist() for k in noise_filter([np.array([]), np.array([])], 20.0)] == [[], []]
    # percentile 0 keeps everything
    assert all(k.all() for k in noise_filter(scores, 0.0))


def test_noise_threshold_hand_values() -> None:
    scores = [np.array([10.0, 9.0, 1.0]), np.array([0.5, 0.2]), np.array([]), np.array([8.0])]
    assert noise_threshold(scores, 50.0) == pytest.approx(4.5)
    assert noise_threshold(scores, 20.0) == pytest.approx(0.41)
    assert noise_threshold(scores, 0.0) == 0.2 and noise_threshold(scores, 100.0) == 10.0
    assert noise_threshold([np.array([3.0])], 20.0) == 3.0
    assert noise_threshold([], 20.0) is None
    assert noise_threshold([np.array([]), np.zeros(0)], 20.0) is None


def test_rank_cosal_power_is_validated() -> None:
    from coseg_cli.config import CosegConfig
    from coseg_cli.errors import ConfigError

    assert CosegConfig(rank_cosal_power=0.0).rank_cosal_power == 0.0
    with pytest.raises(ConfigError, match="rank_cosal_power"):
        CosegConfig(rank_cosal_power=-1.0)


def test_consensus_scores_hand_case() -> None:
    from coseg_cli.ranking import consensus_scores

    e = np.eye(3, dtype=np.float32)
    tilt = np.array([[0.6, 0.8, 0.0]], np.float32)  # unit norm
    out = consensus_scores([e[:2], tilt, e[2:], np.zeros((0, 3), np.float32)])
    # instance [1,0,0]: best 0.6 in image 1, 0 in image 2 → 0.3; [0,1,0]: (0.8 + 0) / 2
    np.testing.assert_allclose(out[0], [0.3, 0.4])
    np.testing.assert_allclose(out[1], [(0.8 + 0.0) / 2])  # best of image 0 is 0.8; image 2: 0
    np.testing.assert_allclose(out[2], [0.0])  # orthogonal to everything: clipped at 0
    assert out[3].shape == (0,)
    np.testing.assert_allclose(consensus_scores([e[:1], np.zeros((0, 3))])[0], [1.0])
    np.testing.assert_allclose(consensus_scores([-e[:1], e[:1]])[0], [0.0])  # negative → 0

"""Stage 2 "common" ranking by hand: co-saliency contrast, NMS, commonness, DDT, the folder step;
and the stage cache keys: a changed option changes exactly the keys of the stages that use it."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from coseg_cli import instances, pipeline, proposals, ranking, saliency, selftrain, train
from coseg_cli.coco import mask_iou
from coseg_cli.config import PRESETS, RUNTIME_FIELDS, CosegConfig
from coseg_cli.errors import ConfigError
from coseg_cli.ranking import commonness, nms_by_iou
from coseg_cli.records import ProposalSet


def _square(h: int, w: int, r0: int, c0: int, side: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[r0:r0 + side, c0:c0 + side] = True
    return m


def test_contrast_prefers_the_mask_that_stops_where_the_blob_stops() -> None:
    cosal = _square(64, 64, 24, 24, 16).astype(np.float32)  # one co-salient blob
    exact = _square(64, 64, 24, 24, 16)
    loose = _square(64, 64, 16, 16, 32)  # blob + background around it
    part = _square(64, 64, 24, 24, 8)  # a quarter of the blob
    masks = np.stack([exact, loose, part])
    inside, ring = instances.contrast_stats(ProposalSet.from_masks(masks), cosal, ring_px=8)
    # 4× coarser grid: the exact mask covers cells 6..9 of 16, all 1; its ring (±2 cells) is 0
    np.testing.assert_allclose(inside, [1.0, 0.25, 1.0], atol=1e-6)
    assert ring[0] == pytest.approx(0.0)
    assert ring[1] == pytest.approx(0.0)
    # the part covers cells 6..7²; dilated by 2 cells → 4..9² (36) minus 4 = 32 ring cells, of
    # which the blob (6..9²) holds 16 − 4 = 12
    assert ring[2] == pytest.approx(12 / 32)
    scores = instances.contrast_scores(inside, ring, inside_power=1.0)
    np.testing.assert_allclose(scores, [1.0, 0.25 * 0.25, 1.0 - 12 / 32], atol=1e-6)
    assert scores.argmax() == 0
    # without the inside factor the loose mask keeps its whole margin, still below the exact one
    np.testing.assert_allclose(instances.contrast_scores(inside, ring, inside_power=0.0),
                               [1.0, 0.25, 1.0 - 12 / 32], atol=1e-6)


def test_contrast_empty_and_full_masks() -> None:
    cosal = np.full((8, 8), 0.5, np.float32)
    empty = ProposalSet.from_masks(np.zeros((0, 8, 8), bool))
    inside, ring = instances.contrast_stats(empty, cosal, ring_px=4)
    assert inside.shape == ring.shape == (0,)
    full = ProposalSet.from_masks(np.ones((1, 8, 8), bool))
    inside, ring = instances.contrast_stats(full, cosal, ring_px=4)
    assert inside[0] == pytest.approx(0.5) and ring[0] == 0.0  # no outside: ring is empty


@pytest.mark.parametrize("shape", [(64, 48), (61, 83), (9, 130)])
def test_atom_covers_equal_resizing_each_atom(shape) -> None:
    """The atoms' covers from the separable INTER_AREA operator are cv2.resize of each atom's
    indicator, also where the grid does not divide the image (fractional cell weights)."""
    h, w = shape
    atom_map = np.random.default_rng(h).integers(0, 7, (h, w)).astype(np.int32)
    atom_map[: h // 2, : w // 3] = 7  # a large atom among speckle
    gh, gw = max(1, h // 4), max(1, w // 4)
    covers = instances.atom_covers(atom_map, gh, gw, 9).toarray()  # atom 8 is absent
    want = np.stack([cv2.resize((atom_map == a).astype(np.float32), (gw, gh),
                                interpolation=cv2.INTER_AREA).ravel() for a in range(9)])
    np.testing.assert_allclose(covers, want, atol=1e-6)


def test_atom_iou_is_the_painted_masks_iou() -> None:
    rng = np.random.default_rng(4)
    atom_map = rng.integers(0, 40, (30, 50)).astype(np.int32)
    atom_map[:, :5] = 40  # atom 41 is absent from the map
    members = rng.random((9, 42)) < 0.2
    members[3] = False  # an empty proposal: IoU 0 with everything, itself included
    props = ProposalSet(atom_map, members, np.zeros(9, np.float32))
    idx = np.array([8, 0, 3, 5, 5])
    got = instances.atom_iou(props, idx)
    painted = props.paint(idx)
    assert np.array_equal(got, mask_iou(painted, painted))
    assert got[2].max() == 0.0 and got[3, 4] == 1.0


def test_contrast_from_atoms_equals_contrast_from_painted_masks() -> None:
    """Stage 2's statistics from atoms are those of the painted masks (cover by cv2.resize)."""
    rng = np.random.default_rng(3)
    h, w = 50, 70
    atom_map = (rng.integers(0, 5, (h // 5, w // 5)).repeat(5, 0).repeat(5, 1) * 3
                + rng.integers(0, 3, (h, w))).astype(np.int32)
    props = ProposalSet(atom_map, rng.random((12, 15)) < 0.3, np.zeros(12, np.float32))
    cosal = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 6)
    inside, ring = instances.contrast_stats(props, cosal, ring_px=8)
    gh, gw = h // 4, w // 4
    s = cv2.resize(cosal, (gw, gh), interpolation=cv2.INTER_AREA)
    for m, i, r in zip(props.masks, inside, ring):
        cover = cv2.resize(m.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
        around = np.clip(cv2.dilate(cover, np.ones((5, 5), np.uint8)) - cover, 0, None)
        assert i == pytest.approx((cover * s).sum() / max(cover.sum(), 1e-12), abs=1e-6)
        assert r == pytest.approx((around * s).sum() / max(around.sum(), 1e-12), abs=1e-6)


def test_nms_on_mask_ious_hand_case() -> None:
    a = _square(10, 10, 0, 0, 4)
    b = _square(10, 10, 0, 1, 4)  # IoU with a: 12 / 20 = 0.6
    c = _square(10, 10, 6, 6, 4)
    iou = mask_iou(*(np.stack([a, b, c]),) * 2)
    np.testing.assert_allclose(iou[0, 1], 0.6)
    np.testing.assert_array_equal(nms_by_iou(np.array([0.9, 0.8, 0.1]), iou, iou_thresh=0.5,
                                             max_keep=5), [0, 2])
    np.testing.assert_array_equal(nms_by_iou(np.array([0.9, 0.8, 0.1]), iou, iou_thresh=0.7,
                                             max_keep=5), [0, 1, 2])
    np.testing.assert_array_equal(nms_by_iou(np.array([0.1, 0.8, 0.9]), iou, iou_thresh=0.7,
                                             max_keep=2), [2, 1])
    np.testing.assert_array_equal(nms_by_iou(np.array([0.5, 0.5, 0.5]), iou, iou_thresh=0.5,
                                             max_keep=5), [0, 2])  # ties: lower index first
    assert nms_by_iou(np.zeros(0), np.zeros((0, 0)), iou_thresh=0.5, max_keep=3).shape == (0,)


def test_commonness_hand_case() -> None:
    e = np.eye(3, dtype=np.float32)
    tilt = np.array([[0.6, 0.8, 0.0]], np.float32)
    cands = [e[:2], tilt, e[2:]]
    seeds = [e[:1], tilt, np.zeros((0, 3), np.float32)]  # image 2 has no seeds: not a voter
    out = commonness(cands, seeds, "mean")
    np.testing.assert_allclose(out[0], [0.6, 0.8])  # only image 1 votes
    np.testing.assert_allclose(out[1], [0.6])  # only image 0 votes (its seed is [1,0,0])
    np.testing.assert_allclose(out[2], [0.0])  # orthogonal to both voters' seeds
    np.testing.assert_allclose(commonness([e[:1]], [e[:1]], "median")[0], [1.0])  # no voter
    with pytest.raises(ValueError, match="aggregate"):
        commonness(cands, seeds, "max")


def test_commonness_median_is_not_lifted_by_a_few_images() -> None:
    """A candidate matched perfectly in one other image out of three (clutter) scores 1/3 by
    the mean but 0 by the median; one matched well in all three (0.6, 0.8, 0.8) keeps a high
    score by both, so only the median ranks the clutter last by a wide margin."""
    e = np.eye(3, dtype=np.float32)
    tilt = np.array([0.6, 0.8, 0.0], np.float32)
    clutter, target = e[0], tilt
    cands = [np.stack([clutter, target])] + [np.zeros((0, 3), np.float32)] * 3
    seeds = [np.zeros((0, 3), np.float32), e[:1], e[1:2], e[1:2]]  # image 1 holds the clutter
    mean, median = commonness(cands, seeds, "mean")[0], commonness(cands, seeds, "median")[0]
    np.testing.assert_allclose(mean, [1 / 3, (0.6 + 0.8 + 0.8) / 3])
    np.testing.assert_allclose(median, [0.0, 0.8])


def test_nms_by_iou_hand_case() -> None:
    iou = np.array([[1.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 1.0]])
    np.testing.assert_array_equal(nms_by_iou(np.array([0.9, 0.8, 0.1]), iou, iou_thresh=0.5,
                                             max_keep=5), [0, 2])
    np.testing.assert_array_equal(nms_by_iou(np.array([0.1, 0.8, 0.9]), iou, iou_thresh=0.5,
                                             max_keep=5), [2, 1])
    np.testing.assert_array_equal(nms_by_iou(np.array([0.1, 0.8, 0.9]), iou, iou_thresh=0.2,
                                             max_keep=5), [2, 0])
    np.testing.assert_array_equal(nms_by_iou(np.array([0.9, 0.8, 0.1]), iou, iou_thresh=0.7,
                                             max_keep=2), [0, 1])
    with pytest.raises(ValueError, match="IoU table"):
        nms_by_iou(np.zeros(2), iou, iou_thresh=0.5, max_keep=3)


def _cands(scores: list[float], emb: np.ndarray, overlaps: np.ndarray | None = None,
           descriptors: np.ndarray | None = None, cells: np.ndarray | None = None
           ) -> instances.Candidates:
    n = len(scores)
    return instances.Candidates(
        cosal=np.zeros((4, 4), np.float32), peaks_xy=np.zeros((n, 2), np.int64),
        prop_idx=np.arange(n), scores=np.array(scores, np.float32), embeddings=emb,
        overlaps=np.eye(n, dtype=np.float32) if overlaps is None else overlaps,
        descriptors=emb if descriptors is None else descriptors,
        feature_map=(np.zeros((0, emb.shape[1]), np.float16) if cells is None
                     else cells.astype(np.float16)))


def test_select_folder_common_multiplies_by_commonness() -> None:
    cfg = dataclasses.replace(PRESETS["fast"], common_seeds=1, common_power=2.0,
                              common_aggregate="mean")
    e = np.eye(2, dtype=np.float32)
    (order0, s0), (order1, s1) = instances.select_folder(
        [_cands([0.5, 0.4], e), _cands([0.3], e[1:])], cfg)
    # image 0 is matched against image 1's seed [0,1]: commonness 0 and 1 → the second wins,
    # its score 0.4 over the image's best 0.5
    np.testing.assert_array_equal(order0, [1, 0])
    np.testing.assert_allclose(s0, [0.8, 0.0], atol=1e-7)
    # image 1 against image 0's first (best) candidate [1,0]: commonness 0
    np.testing.assert_allclose(s1, [0.0], atol=1e-7)
    np.testing.assert_array_equal(order1, [0])


def test_select_folder_common_ranks_by_commonness_before_nms() -> None:
    """Seeds are each image's best candidates after NMS on contrast; commonness re-ranks every
    candidate *before* NMS, so a candidate that contrast alone would have suppressed (it
    overlaps a better-contrasted one) wins when only it is matched in the other images; at
    most `max_instances` survive."""
    e = np.eye(3, dtype=np.float32)
    overlap = np.array([[1, 0.8, 0], [0.8, 1, 0], [0, 0, 1]], np.float32)
    img0 = _cands([1.0, 0.9, 0.2], e, overlap)
    img1 = _cands([1.0, 0.5], np.stack([e[1], e[0]]))
    cfg = dataclasses.replace(PRESETS["fast"], common_seeds=1, max_instances=3,
                              nms_iou_thresh=0.5)
    (order0, s0), (order1, s1) = instances.select_folder([img0, img1], cfg)
    # image 1's one seed is [0,1,0]: image 0's candidate 1 (0.9 × 1) beats candidate 0 (1 × 0)
    # and suppresses it; candidate 2 (orthogonal, 0) does not overlap: kept last
    np.testing.assert_array_equal(order0, [1, 2])
    np.testing.assert_allclose(s0, [0.9, 0.0])
    # image 0's seed is its candidate 0 ([1,0,0], best contrast): image 1's second matches it
    np.testing.assert_array_equal(order1, [1, 0])
    np.testing.assert_allclose(s1, [0.5, 0.0])
    # two seeds: image 0's are candidates 0 and 2 (1 overlaps 0), so now its candidate 0 is
    # matched too (image 1's seeds are [0,1,0] and [1,0,0]) and wins; one instance kept
    cfg2 = dataclasses.replace(cfg, common_seeds=2, max_instances=1)
    (order0, s0), (order1, s1) = instances.select_folder([img0, img1], cfg2)
    np.testing.assert_array_equal(order0, [0])
    np.testing.assert_allclose(s0, [1.0])
    np.testing.assert_array_equal(order1, [1])
    np.testing.assert_allclose(s1, [0.5])


def _cells(num_object: int, num_background: int, seed: int) -> np.ndarray:
    """Grid cells of one image: background cells scatter a little around [1, 1, 0], object
    cells sit at [1, 1, 3] (the direction of largest variance across the folder is e2)."""
    rng = np.random.default_rng(seed)
    bg = np.array([1.0, 1.0, 0.0]) + 0.1 * rng.standard_normal((num_background, 3))
    obj = np.tile([1.0, 1.0, 3.0], (num_object, 1))
    return np.concatenate([obj, bg])


def test_ddt_direction_is_oriented_by_the_anchors_else_by_the_minority() -> None:
    maps = [_cells(3, 17, 0), _cells(2, 18, 1), np.zeros((0, 3))]
    obj, bg = np.array([[1.0, 1.0, 3.0]]), np.array([[1.0, 1.0, 0.0]])
    for anchors, object_sign in ((obj, 1), (bg, -1), (np.zeros((0, 3)), 1)):
        mean, direction = ranking.ddt_direction(maps, anchors)
        np.testing.assert_allclose(mean, np.concatenate(maps).mean(0))
        assert abs(direction[2]) > 0.99  # the axis that separates object from background
        for m, n_obj in zip(maps, (3, 2)):
            p = ranking.ddt_indicator(m, mean, direction) * object_sign
            assert (p[:n_obj] > 0).all() and (p[n_obj:] < 0).all()
    # without anchors the side with fewer cells is positive: with the "object" covering most of
    # every image, it is the background's side, whichever sign the eigen-solver returns
    big = [np.concatenate([np.tile([1.0, 1.0, 3.0], (17, 1)), m[3:6]]) for m in maps[:2]]
    mean, direction = ranking.ddt_direction(big, np.zeros((0, 3)))
    p = ranking.ddt_indicator(big[0], mean, direction)
    assert (p[:17] < 0).all() and (p[17:] > 0).all()
    assert ranking.ddt_direction([np.zeros((0, 3))], obj) is None


def test_select_folder_common_demotes_the_background_side_of_ddt() -> None:
    """Per image a background-like candidate with the best contrast and an object-like one:
    both are seeds (they orient the direction: the object's projection is the larger), the
    background one lies on the negative side and is multiplied by `ddt_negative_weight`,
    dropping behind; weight 1 leaves the order alone."""
    e = np.full((2, 3), 1 / np.sqrt(3), np.float32)  # identical embeddings: commonness 1
    desc = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 3.0]], np.float32)  # background, object
    imgs = [_cands([1.0, 0.9], e, descriptors=desc, cells=_cells(3, 17, s)) for s in (0, 1)]
    cfg = dataclasses.replace(PRESETS["fast"], common_seeds=2, ddt_negative_weight=0.25)
    for order, scores in instances.select_folder(imgs, cfg):
        np.testing.assert_array_equal(order, [1, 0])
        np.testing.assert_allclose(scores, [0.9, 0.25], rtol=1e-6)
    off = dataclasses.replace(cfg, ddt_negative_weight=1.0)
    for order, scores in instances.select_folder(imgs, off):
        np.testing.assert_array_equal(order, [0, 1])
        np.testing.assert_allclose(scores, [1.0, 0.9], rtol=1e-6)
    with pytest.raises(ConfigError, match="ddt_negative_weight"):
        dataclasses.replace(cfg, ddt_negative_weight=1.5)


def test_mask_features_average_raw_and_normalised_cells() -> None:
    feats = torch.zeros(1, 2, 2, 2)
    feats[0, 0, 0, 0], feats[0, 1, 1, 1] = 4.0, 2.0  # cell (0,0) = [4,0], cell (1,1) = [0,2]
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True  # covers cell (0,0)
    masks[1, :, :] = True  # all four cells
    emb, desc = instances.mask_features(feats, masks)
    np.testing.assert_allclose(desc, [[4.0, 0.0], [1.0, 0.5]], atol=1e-6)
    np.testing.assert_allclose(emb[0], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(emb[1], np.array([1.0, 1.0]) / np.sqrt(2), atol=1e-3)  # F̂ has an ε
    cells = instances.feature_cells(feats)
    assert cells.dtype == np.float16 and cells.shape == (4, 2)
    np.testing.assert_array_equal(cells[0], [4.0, 0.0])
    np.testing.assert_array_equal(cells[3], [0.0, 2.0])


# ---------------------------------------------------------------- stage cache keys

_STAGES = ("prior", "proposals", "train", "instances", "select")


def _keys(cfg: CosegConfig) -> dict[str, str]:
    """Every cache key of one image under `cfg`, chained as the pipeline chains them (the
    fine-tuned weights' digest stands in as the training key)."""
    model_key = train.train_cache_key(["img"], cfg)
    return {"prior": pipeline.prior_key("img", cfg),
            "proposals": pipeline.proposals_key("img", cfg),
            "train": model_key,
            "instances": pipeline.instances_key("img", cfg, model_key)}


_DECLARED = {"prior": saliency.CONFIG_FIELDS, "proposals": proposals.CONFIG_FIELDS,
             "train": train.TRAIN_FIELDS, "instances": instances.CONFIG_FIELDS,
             "select": instances.SELECT_FIELDS, "selftrain": selftrain.CONFIG_FIELDS}
# what each stage consumes: a change upstream must reach its key
_UPSTREAM = {"prior": (), "proposals": ("prior",), "train": (), "instances": ("proposals",
                                                                              "train")}


def _changed_value(field: dataclasses.Field, value):
    choices = {"prior": ("fusion", "spectral_residual"), "proposal_method": ("other",),
               "feature_layer": ("fc6_new", "pool5"), "freeze_until": ("none", "conv3_3"),
               "ranking": ("peaks", "common"), "cosal_stride": (16, 32),
               "common_aggregate": ("mean", "median"),
               "device": ("cpu", "auto"), "preset": ("x",)}
    if field.name in choices:
        return next(c for c in choices[field.name] if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 32
    return value / 2 if value > 0 else 0.25


@pytest.mark.parametrize("field", dataclasses.fields(CosegConfig), ids=lambda f: f.name)
def test_a_changed_field_changes_exactly_the_keys_that_use_it(field) -> None:
    base = PRESETS["paper"]  # every single-field change from it is a valid config
    declared = {s for s, names in _DECLARED.items() if field.name in names}
    if field.name in RUNTIME_FIELDS:
        assert not declared, f"{field.name} is runtime-only yet declared by {declared}"
    else:
        assert declared, f"{field.name} is declared by no stage and is not runtime-only"
    cfg = CosegConfig(**{**dataclasses.asdict(base),
                         field.name: _changed_value(field, getattr(base, field.name))})
    before, after = _keys(base), _keys(cfg)
    expect = set()
    for stage in ("prior", "train", "proposals", "instances"):  # upstream first
        if stage in declared or any(u in expect for u in _UPSTREAM[stage]):
            expect.add(stage)
    got = {s for s in before if before[s] != after[s]}
    assert got == expect, (field.name, got, expect)


def test_peaks_ranking_on_the_stride_16_map() -> None:
    """Peaks found on the finer conv5_3 map are back-propagated through that same map."""
    import torch

    from coseg_cli.errors import ConfigError
    from coseg_cli.model import CoSegNet

    torch.manual_seed(0)
    net = CoSegNet().eval()
    torch.nn.init.normal_(net.saliency.weight, std=0.01)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    masks = np.stack([_square(48, 64, 4, 4, 16), _square(48, 64, 20, 30, 20)])
    cfg = dataclasses.replace(PRESETS["fast"], ranking="peaks", infer_size=128, max_peaks=3)
    ps = instances.score_peaks(net, img, masks, cfg, "cpu", chunk=2)
    assert ps.peak_rc.max() >= 4  # a cell of the 8×8 map, beyond the 4×4 pool5 map
    assert ps.scores.shape == (len(ps.peak_rc), 2) and np.isfinite(ps.scores).all()
    cand = instances.image_stage2(net, img, ProposalSet.from_masks(masks), cfg, "cpu")
    assert len(cand.prop_idx) == len(cand.peaks_xy) >= 1
    with pytest.raises(ConfigError, match="cosal_stride 16 needs feature_layer pool5"):
        dataclasses.replace(cfg, feature_layer="fc6_new")

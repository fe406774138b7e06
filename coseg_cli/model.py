"""The DeepCO3 network: ImageNet VGG-16 trunk, a feature head and a zero-initialised 1×1
saliency head (paper §3.2, head and initialisation as in the authors' code), plus the
input/prior resizing it needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CosegConfig
from .errors import InputError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's convention, RGB in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
FC6_CHANNELS = 4096  # the official head's width (fc6 as a 7×7 conv)


@dataclass(frozen=True)
class VggConv:
    """One 3×3 conv (pad 1, then ReLU) of torchvision's VGG-16 `features`.

    Attributes:
        name: the paper's layer name, conv{block}_{k}. index: its position in `features`.
        in_channels, out_channels: its channels. stride: downsampling of its input (1 … 16).
    """

    name: str
    index: int
    in_channels: int
    out_channels: int
    stride: int


def _vgg16_convs() -> tuple[VggConv, ...]:
    """The 13 convs of VGG-16 configuration "D": blocks of 2, 2, 3, 3, 3 convs of 64 … 512
    channels, each block followed by a 2×2 max-pool (one `features` entry, as a ReLU is)."""
    convs: list[VggConv] = []
    index, cin, stride = 0, 3, 1
    for block, (num, cout) in enumerate(((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)),
                                        start=1):
        for k in range(1, num + 1):
            convs.append(VggConv(f"conv{block}_{k}", index, cin, cout, stride))
            index, cin = index + 2, cout  # conv, ReLU
        index, stride = index + 1, stride * 2  # max-pool
    return tuple(convs)


# The one definition of the VGG-16 trunk's layout; the network, the freezing, the weight
# loaders and benchmarks/train_speed.py all read it from here.
VGG16_CONVS = _vgg16_convs()
# torchvision `vgg16().features` index of each conv, by the paper's layer name.
CONV_LAYERS = {c.name: c.index for c in VGG16_CONVS}


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG-16 `features` layout (13 convs, ReLUs, 5 max-pools), no weights."""
    layers: list[nn.Module] = []
    for conv in VGG16_CONVS:
        if len(layers) < conv.index:  # the block before ended: its max-pool
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        layers += [nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, padding=1),
                   nn.ReLU(inplace=True)]
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class CoSegNet(nn.Module):
    """VGG-16 features → feature head → 1×1 saliency head.

    Attributes:
        features: the VGG-16 trunk up to pool5 (plain nn.Conv2d layers, so peak
            back-propagation can swap their backward rule).
        head: nn.Identity for "pool5" (512 ch), or a fresh 7×7 conv (pad 3) + ReLU for "fc6_new".
        saliency: 1×1 conv C→1, zero weights and bias (S̃ = 0.5 everywhere at the start).

    Args:
        feature_layer: a `FEATURE_LAYERS` name, which `CosegConfig` checks (another name is a
            KeyError here).
    """

    def __init__(self, feature_layer: str = CosegConfig.feature_layer,
                 fc6_channels: int = FC6_CHANNELS,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        channels = {"pool5": 512, "fc6_new": fc6_channels}[feature_layer]
        self.feature_layer = feature_layer
        self.features = vgg16_features()
        if feature_layer == "pool5":
            self.head: nn.Module = nn.Identity()
        else:
            conv = nn.Conv2d(512, fc6_channels, kernel_size=7, padding=3)
            # He init keeps the ReLU features' scale; seeded so a run is reproducible.
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu",
                                    generator=generator)
            nn.init.zeros_(conv.bias)
            self.head = nn.Sequential(conv, nn.ReLU(inplace=True))
        self.out_channels = channels
        self.saliency = nn.Conv2d(channels, 1, kernel_size=1)
        nn.init.zeros_(self.saliency.weight)
        nn.init.zeros_(self.saliency.bias)

    def forward(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        """Args: x float32[B,3,S,S] (ImageNet-normalised, S a multiple of 32), or when `start`
        > 0 the activations entering `features[start]` (train.frozen_prefix computed the
        layers before it once).

        Returns:
            feats float32[B,C,S/32,S/32] (ReLU outputs, unnormalised) and
            logits float32[B,1,S/32,S/32] (saliency logits; S̃ = sigmoid(logits)).
        """
        feats = self.head(self.features[start:](x))
        return feats, self.saliency(feats)


def upsample_logits(logits: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Fixed (non-learned) bilinear upsampling of logits; apply sigmoid after, as the paper does.

    Args:
        logits: float32[B,1,h,w].
        size: output side S, or (H, W).

    Returns:
        float32[B,1,H,W] logits.
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)


def preprocess(images: Sequence[np.ndarray], size: int) -> Tensor:
    """Resize (aspect ignored, bilinear with antialias) and ImageNet-normalise a list of images.

    Args:
        images: uint8[H,W,3] RGB arrays (uint8[H,W] grey is repeated to 3 channels).
        size: output side in pixels.

    Returns:
        float32[B,3,size,size] on the CPU.

    Raises:
        InputError: an image is not uint8 HxW or HxWx3.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32)
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise InputError(f"image {i}: expected uint8[H,W,3], got {arr.dtype}{list(arr.shape)}")
        t = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)[None].float() / 255.0
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
        out[i] = ((t.clamp(0.0, 1.0) - mean) / std)[0]
    return out


def resize_prior(prior: np.ndarray, size: int) -> Tensor:
    """Resize a saliency prior like its image (aspect ignored, bilinear with antialias).

    Args:
        prior: float32[H,W] in [0, 1].
        size: output side in pixels.

    Returns:
        float32[size,size] in [0, 1], CPU.
    """
    arr = np.asarray(prior, dtype=np.float32)
    if arr.ndim != 2:
        raise InputError(f"prior must be float32[H,W], got shape {list(arr.shape)}")
    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t[0, 0].clamp(0.0, 1.0)


def build_model(cfg: CosegConfig, state_dict: dict[str, Tensor],
                fc6_channels: int = FC6_CHANNELS) -> CoSegNet:
    """CoSegNet with ImageNet VGG-16 features loaded (strict) and the head chosen by the config.

    Args:
        cfg: uses `feature_layer`, `seed` (fresh head init) and `freeze_until`.
        state_dict: `features.{idx}.{weight,bias}` from `weights.load_vgg16_features`.

    Raises:
        WeightsError: the state dict does not fit the trunk.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    model = CoSegNet(cfg.feature_layer, fc6_channels=fc6_channels, generator=gen)
    feats = {k[len("features."):]: v for k, v in state_dict.items() if k.startswith("features.")}
    try:
        model.features.load_state_dict(feats, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"VGG-16 weights do not fit the trunk: {exc}") from None
    freeze(model, cfg.freeze_until)
    return model


def freeze(model: CoSegNet, until: str) -> list[str]:
    """Freeze conv1_1 … `until` (inclusive); "none" leaves every layer trainable.

    Frozen layers form a prefix, so autograd builds no graph through them at all.

    Args:
        until: a `FREEZE_CHOICES` name, which `CosegConfig` checks (another name is a KeyError
            here).

    Returns:
        The names of the frozen conv layers.
    """
    for p in model.parameters():
        p.requires_grad_(True)
    if until == "none":
        return []
    last = CONV_LAYERS[until]
    frozen = [name for name, idx in CONV_LAYERS.items() if idx <= last]
    for idx in range(last + 1):
        for p in model.features[idx].parameters():
            p.requires_grad_(False)
    return frozen


__all__ = [
    "CONV_LAYERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VGG16_CONVS",
    "CoSegNet",
    "VggConv",
    "build_model",
    "freeze",
    "preprocess",
    "resize_prior",
    "upsample_logits",
    "vgg16_features",
]

"""The DeepCO3 network: ImageNet VGG-16 trunk, a feature head and a zero-initialised 1×1
saliency head (deepco3.md, stage 1), plus the input/prior resizing it needs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FEATURE_LAYERS, FREEZE_CHOICES, CosegConfig
from .errors import ConfigError, InputError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision convention (weights.md), RGB in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDE = 32  # five 2×2 pools: 448 → 14
FC6_CHANNELS = 4096  # the official head's width (fc6 as a 7×7 conv)
# torchvision `vgg16().features` index of each conv, by the paper's layer name.
CONV_LAYERS = {
    "conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7, "conv3_1": 10, "conv3_2": 12,
    "conv3_3": 14, "conv4_1": 17, "conv4_2": 19, "conv4_3": 21, "conv5_1": 24, "conv5_2": 26,
    "conv5_3": 28,
}


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG-16 `features` layout (13 convs, ReLUs, 5 max-pools), no weights."""
    cfg: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                            512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = int(v)
    return nn.Sequential(*layers)


class CoSegNet(nn.Module):
    """VGG-16 features → feature head → 1×1 saliency head.

    Attributes:
        features: the VGG-16 trunk up to pool5 (plain nn.Conv2d layers, so peak
            back-propagation can swap their backward rule).
        head: nn.Identity for "pool5" (512 ch), or a fresh 7×7 conv (pad 3) + ReLU for "fc6_new".
        saliency: 1×1 conv C→1, zero weights and bias (S̃ = 0.5 everywhere at the start).
    """

    def __init__(self, feature_layer: str = "pool5", fc6_channels: int = FC6_CHANNELS,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if feature_layer not in FEATURE_LAYERS:
            raise ConfigError(f"feature_layer must be one of {FEATURE_LAYERS}, "
                              f"got {feature_layer!r}")
        self.feature_layer = feature_layer
        self.features = vgg16_features()
        if feature_layer == "pool5":
            self.head: nn.Module = nn.Identity()
            channels = 512
        else:
            conv = nn.Conv2d(512, fc6_channels, kernel_size=7, padding=3)
            # He init keeps the ReLU features' scale; seeded so a run is reproducible.
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu",
                                    generator=generator)
            nn.init.zeros_(conv.bias)
            self.head = nn.Sequential(conv, nn.ReLU(inplace=True))
            channels = fc6_channels
        self.out_channels = channels
        self.saliency = nn.Conv2d(channels, 1, kernel_size=1)
        nn.init.zeros_(self.saliency.weight)
        nn.init.zeros_(self.saliency.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Args: x float32[B,3,S,S] (ImageNet-normalised, S a multiple of 32).

        Returns:
            feats float32[B,C,S/32,S/32] (ReLU outputs, unnormalised) and
            logits float32[B,1,S/32,S/32] (saliency logits; S̃ = sigmoid(logits)).
        """
        feats = self.head(self.features(x))
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

    Returns:
        The names of the frozen conv layers.
    """
    if until not in FREEZE_CHOICES:
        raise ConfigError(f"freeze_until must be one of {FREEZE_CHOICES}, got {until!r}")
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
    "STRIDE",
    "CoSegNet",
    "build_model",
    "freeze",
    "preprocess",
    "resize_prior",
    "upsample_logits",
    "vgg16_features",
]

"""Stage 2a: peaks of the co-saliency logit map and PRM peak back-propagation (instance maps).

A peak marks one likely instance; back-propagating from it with the PRM rule (Zhou et al.,
CVPR 2018) gives an instance-aware map O that highlights the pixels supporting that peak. The
conv rule matches the authors' MatConvNet `Conv.PRM_backward`: x' = x − min(x), W⁺ = relu(W),
Z = conv(x', W⁺), g ← g / Z (0 where Z < 1e-10), grad_in = x' ⊙ convᵀ(g, W⁺).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_Z_EPS = 1e-10  # authors' Conv.m: normaliser entries below this give zero gradient
# Peaks per vmapped backward pass of `peak_backprop`, the default of every caller (stage 2 and
# the pipeline included): gradient memory ∝ chunk; the maps agree across chunk sizes to
# rounding (tests/test_peaks.py).
BACKPROP_CHUNK = 4


def find_peaks(logits: Tensor | np.ndarray, *, max_peaks: int | None = None) -> np.ndarray:
    """3×3 local maxima of a logit map that are at least its median.

    A cell is a peak when it equals the maximum of its 8-neighbourhood (cells outside the map are
    ignored), so ties count: every cell of a flat plateau that is not beside a higher cell is a
    peak. Consequently a constant map returns *every* cell — the rule applied literally (as
    PRM's `maxpool(x) == x` and the paper do); callers that cannot afford that pass `max_peaks`.

    Args:
        logits: float[h,w] (numpy or torch, any device), e.g. the 14×14 saliency logits.
        max_peaks: keep only the first `max_peaks` in the sort order below; None = no cap
            (the paper's setting).

    Returns:
        int64[K,2] (row, col) sorted by value descending, then row, then column (deterministic).

    Raises:
        ValueError: if the map is not 2-D or holds NaN/inf (a diverged model, a bug upstream),
            or max_peaks < 0.
    """
    if isinstance(logits, Tensor):
        logits = logits.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(logits, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"find_peaks expects a 2-D map, got shape {a.shape}")
    if max_peaks is not None and max_peaks < 0:
        raise ValueError(f"find_peaks: max_peaks must be >= 0 or None, got {max_peaks}")
    if a.size == 0:
        return np.zeros((0, 2), np.int64)
    if not np.all(np.isfinite(a)):
        raise ValueError("find_peaks: the logit map holds NaN or inf")
    # 3×3 max filter with -inf outside the map, from 9 shifted views of a padded copy
    h, w = a.shape
    padded = np.pad(a, 1, constant_values=-np.inf)
    neigh_max = np.max(
        np.stack([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]), axis=0
    )
    is_peak = (a >= neigh_max) & (a >= np.median(a))
    rows, cols = np.nonzero(is_peak)
    order = np.lexsort((cols, rows, -a[rows, cols]))  # last key is the primary one
    peaks = np.stack([rows[order], cols[order]], axis=1).astype(np.int64)
    if max_peaks is not None:
        peaks = peaks[:max_peaks]
    return peaks


class _PRMConv2d(torch.autograd.Function):
    """conv2d whose forward is the usual one and whose input gradient follows the PRM rule.

    `pad` is (left, right, top, bottom) zero padding; in the backward pass it surrounds x' (as
    native conv padding would), not x. Symmetric padding runs natively (no padded copy).
    `generate_vmap_rule` lets `peak_backprop` back-propagate many one-hot gradients in one
    vmapped pass; Z does not depend on the gradient, so it is computed once, not per peak.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, pad: tuple[int, int, int, int],
                stride: Any, dilation: Any, groups: int) -> Tensor:
        left, right, top, bottom = pad
        if left == right and top == bottom:
            return F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
        return F.conv2d(F.pad(x, pad), weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, _, pad, stride, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.conv_args = (pad, stride, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        pad, stride, dilation, groups = ctx.conv_args
        left, right, top, bottom = pad
        native = left == right and top == bottom
        padding = (top, left) if native else (0, 0)
        # per-sample min = the authors' whole-tensor min for their batch of one image
        x_shift = x - x.amin(dim=(1, 2, 3), keepdim=True)
        if not native:
            x_shift = F.pad(x_shift, pad)
        w_pos = weight.clamp(min=0)
        z = F.conv2d(x_shift, w_pos, None, stride, padding, dilation, groups)
        g = torch.where(z < _Z_EPS, torch.zeros_like(grad_out), grad_out / z.clamp(min=_Z_EPS))
        grad_x = x_shift * torch.nn.grad.conv2d_input(
            x_shift.shape, w_pos, g, stride, padding, dilation, groups)
        if not native:
            grad_x = grad_x[..., top:grad_x.shape[-2] - bottom, left:grad_x.shape[-1] - right]
        return grad_x, None, None, None, None, None, None


def _prm_forward(conv: nn.Conv2d) -> Any:
    # padding as nn.Conv2d._conv_forward does it: (left, right, top, bottom) for F.pad
    pad = tuple(int(p) for p in conv._reversed_padding_repeated_twice)

    def forward(x: Tensor) -> Tensor:
        weight = conv.weight.detach()
        bias = None if conv.bias is None else conv.bias.detach()
        if conv.padding_mode != "zeros":
            # reflect/replicate/circular: padded cells are copies of x, so pad first (the copies'
            # gradient flows back through F.pad) and run the PRM conv unpadded
            x = F.pad(x, pad, mode=conv.padding_mode)
            return _PRMConv2d.apply(x, weight, bias, (0, 0, 0, 0), conv.stride, conv.dilation,
                                    conv.groups)
        return _PRMConv2d.apply(x, weight, bias, pad, conv.stride, conv.dilation, conv.groups)
    return forward


@contextmanager
def prm_backward(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every nn.Conv2d of `model` back-propagates with the PRM rule.

    Also puts the model in eval mode and switches parameter gradients off; conv forwards,
    training flags and requires_grad flags are all restored on exit, even after an error.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    saved_forward = [m.__dict__.get("forward") for m in convs]
    saved_training = [(m, m.training) for m in model.modules()]
    saved_grad = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for m in convs:
            m.forward = _prm_forward(m)  # type: ignore[method-assign]
        model.eval()
        for p, _ in saved_grad:
            p.requires_grad_(False)
        yield model
    finally:
        for m, fwd in zip(convs, saved_forward, strict=True):
            if fwd is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = fwd  # type: ignore[method-assign]
        for m, flag in saved_training:
            m.training = flag
        for p, flag in saved_grad:
            p.requires_grad_(flag)


def _logits_of(output: Any) -> Tensor:
    # CoSegNet-style models return (features, logits); plain ones return the logits
    logits = output[-1] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, Tensor) or logits.ndim != 4 or logits.shape[1] != 1:
        shape = getattr(logits, "shape", type(logits).__name__)
        raise ValueError(f"peak_backprop: model must return logits [B,1,h,w], got {shape}")
    return logits


def peak_backprop(model: nn.Module, x: Tensor, peaks: np.ndarray | Tensor, *,
                  chunk: int = BACKPROP_CHUNK) -> Tensor:
    """PRM peak back-propagation: one instance map per peak.

    For each peak, a one-hot gradient at that cell of the logit map is back-propagated to the
    input with the PRM rule at every nn.Conv2d (ReLU and max-pool backward as usual). One forward
    pass serves all peaks; their one-hot gradients go back `chunk` at a time in one vmapped
    backward pass (`is_grads_batched`), so gradient memory is ∝ chunk while the activations and
    each layer's normaliser Z are shared by all peaks.

    The instance map is the input gradient summed over RGB (the authors' `sum(der, 3)`), then
    clamped at 0. For a net of convs, ReLUs and max-pools the rule yields only values ≥ 0 (x' ≥ 0,
    W⁺ ≥ 0, Z ≥ 0), so the clamp changes nothing there and only guards other layers. The map is
    not rescaled, but the rule conserves mass layer by layer, so for such nets each map sums to
    1 over the input (less only where some Z < 1e-10).

    Args:
        model: nn.Module mapping float32[B,3,H,W] → logits [B,1,h,w], or a tuple whose last item
            is those logits (CoSegNet's (features, logits)). Only ops with vmap support (all
            standard layers) may sit between input and logits. Its training and requires_grad
            flags are restored afterwards and no parameter gradient is accumulated.
        x: float32[1,3,H,W], the normalised network input; its device is used.
        peaks: int[K,2] (row, col) cells of the logit map, e.g. from `find_peaks`.
        chunk: peaks per backward pass (≥ 1).

    Returns:
        float32[K,H,W] on x's device, ≥ 0.

    Raises:
        ValueError: on a bad shape, chunk < 1, or a peak outside the logit map.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"peak_backprop expects x of shape [1,C,H,W], got {tuple(x.shape)}")
    if chunk < 1:
        raise ValueError(f"peak_backprop: chunk must be >= 1, got {chunk}")
    peaks_np = np.asarray(peaks.cpu() if isinstance(peaks, Tensor) else peaks, np.int64)
    peaks_np = peaks_np.reshape(-1, 2)
    num_peaks = peaks_np.shape[0]
    height, width = x.shape[2:]
    maps = torch.zeros((num_peaks, height, width), dtype=torch.float32, device=x.device)
    if num_peaks == 0:
        return maps
    with prm_backward(model), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        logits = _logits_of(model(x_in))
        h, w = logits.shape[2:]
        if (peaks_np < 0).any() or (peaks_np[:, 0] >= h).any() or (peaks_np[:, 1] >= w).any():
            raise ValueError(f"peak_backprop: peaks outside the {h}×{w} logit map")
        for start in range(0, num_peaks, chunk):
            block = torch.as_tensor(peaks_np[start:start + chunk], device=x.device)
            n = block.shape[0]
            one_hot = logits.new_zeros((n, *logits.shape))  # [n,1,1,h,w]: one grad per peak
            one_hot[torch.arange(n, device=x.device), 0, 0, block[:, 0], block[:, 1]] = 1.0
            (grad,) = torch.autograd.grad(logits, x_in, one_hot, is_grads_batched=True,
                                          retain_graph=start + chunk < num_peaks)
            maps[start:start + n] = grad[:, 0].sum(dim=1).clamp(min=0).float()
    return maps

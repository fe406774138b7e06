"""peaks: local-maximum rule against brute force, PRM back-propagation against a hand-written
layer-by-layer computation of the rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coseg_cli.peaks import find_peaks, peak_backprop, prm_backward

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


# ---------------------------------------------------------------- find_peaks

def _brute_peaks(a: np.ndarray) -> set[tuple[int, int]]:
    h, w = a.shape
    med = np.median(a)
    out = set()
    for r in range(h):
        for c in range(w):
            neigh = [a[rr, cc] for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                     if 0 <= rr < h and 0 <= cc < w and (rr, cc) != (r, c)]
            if all(a[r, c] >= v for v in neigh) and a[r, c] >= med:
                out.add((r, c))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_find_peaks_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 9, size=2)
    a = rng.integers(0, 4, size=(h, w)).astype(np.float32)  # few values → many ties
    peaks = find_peaks(a)
    assert peaks.dtype == np.int64 and peaks.shape[1] == 2
    assert {tuple(p) for p in peaks.tolist()} == _brute_peaks(a)
    assert len({tuple(p) for p in peaks.tolist()}) == len(peaks)
    # sorted by value desc, then row, then col
    keys = [(-a[r, c], r, c) for r, c in peaks.tolist()]
    assert keys == sorted(keys)


def test_find_peaks_median_rule_and_torch_input() -> None:
    a = np.array([[1, 0, 3, 3, 3], [0, 0, 3, 5, 3], [3, 3, 3, 3, 3], [3, 3, 3, 3, 3],
                  [3, 3, 3, 3, 3]], np.float32)  # (0,0) is a local max but below the median 3
    peaks = find_peaks(torch.from_numpy(a))
    got = {tuple(p) for p in peaks.tolist()}
    assert (0, 0) not in got
    assert tuple(peaks[0]) == (1, 3)  # the strongest first
    assert got == _brute_peaks(a)


def test_find_peaks_constant_map_returns_every_cell_and_cap() -> None:
    peaks = find_peaks(np.zeros((3, 4), np.float32))
    assert peaks.tolist() == [[r, c] for r in range(3) for c in range(4)]  # row-major on ties
    assert find_peaks(np.zeros((3, 4)), max_peaks=2).tolist() == [[0, 0], [0, 1]]
    assert find_peaks(np.ones((1, 1))).tolist() == [[0, 0]]
    assert find_peaks(np.zeros((0, 0))).shape == (0, 2)


def test_find_peaks_rejects_bad_maps() -> None:
    with pytest.raises(ValueError):
        find_peaks(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError):
        find_peaks(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError):
        find_peaks(np.zeros((2, 2)), max_peaks=-1)


# ---------------------------------------------------------------- peak_backprop

class TinyNet(nn.Module):
    """conv-relu-maxpool-conv-relu-conv1x1: the layer types of VGG-16 + a saliency head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(inplace=True))
        self.saliency = nn.Conv2d(5, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.saliency(self.features(x))


def _tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():  # biases both signs so that some ReLUs are off
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.normal_(0.0, 0.3)
    return net


def _manual_prm_conv(x: np.ndarray, w: np.ndarray, g: np.ndarray, pad: int) -> np.ndarray:
    """The PRM rule for a stride-1 conv, written out (float64, one sample).

    x: [C,H,W] layer input, w: [O,C,k,k], g: [O,H',W'] gradient at the output.
    """
    xs = x - x.min()
    wp = np.maximum(w, 0.0)
    k = w.shape[2]
    xp = np.pad(xs, ((0, 0), (pad, pad), (pad, pad)))
    ho, wo = g.shape[1:]
    z = np.zeros_like(g)
    for u in range(k):
        for v in range(k):
            z += np.einsum("oc,chw->ohw", wp[:, :, u, v], xp[:, u:u + ho, v:v + wo])
    s = np.where(z < 1e-10, 0.0, g / np.where(z < 1e-10, 1.0, z))
    gp = np.zeros_like(xp)
    for u in range(k):
        for v in range(k):
            gp[:, u:u + ho, v:v + wo] += np.einsum("oc,ohw->chw", wp[:, :, u, v], s)
    h, wdt = x.shape[1:]
    return xs * gp[:, pad:pad + h, pad:pad + wdt]


def _manual_instance_map(net: TinyNet, x: torch.Tensor, peak: tuple[int, int]) -> np.ndarray:
    conv1, _, _pool, conv2, _ = net.features
    conv3 = net.saliency
    with torch.no_grad():
        a0 = x[0].double()
        z1 = F.conv2d(a0[None], conv1.weight.double(), conv1.bias.double(), padding=1)[0]
        a1 = z1.clamp(min=0)
        p1, idx = F.max_pool2d(a1[None], 2, 2, return_indices=True)
        p1, idx = p1[0], idx[0]
        z2 = F.conv2d(p1[None], conv2.weight.double(), conv2.bias.double(), padding=1)[0]
        a2 = z2.clamp(min=0)
    np_ = lambda t: t.detach().numpy()
    g = np.zeros((1, *a2.shape[1:]))
    g[0, peak[0], peak[1]] = 1.0
    g = _manual_prm_conv(np_(a2), np_(conv3.weight.double()), g, 0)  # 1×1 head
    g = g * (np_(z2) > 0)  # ReLU
    g = _manual_prm_conv(np_(p1), np_(conv2.weight.double()), g, 1)
    # max-pool: each pooled gradient goes to the cell its max came from
    g_up = np.zeros(a1.shape)
    flat = g_up.reshape(a1.shape[0], -1)
    for c in range(a1.shape[0]):
        np.add.at(flat[c], np_(idx[c]).ravel(), g[c].ravel())
    g = g_up * (np_(z1) > 0)  # ReLU
    g = _manual_prm_conv(np_(a0), np_(conv1.weight.double()), g, 1)
    return np.maximum(g.sum(axis=0), 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_peak_backprop_equals_manual_rule(device: str) -> None:
    net = _tiny(0).to(device)
    torch.manual_seed(1)
    x = torch.randn(1, 3, 12, 12, device=device)
    with torch.no_grad():
        logits = net(x)[0, 0]
    peaks = find_peaks(logits)
    assert len(peaks) >= 2
    maps = peak_backprop(net, x, peaks, chunk=3)
    assert maps.shape == (len(peaks), 12, 12) and maps.dtype == torch.float32
    assert maps.device.type == device
    net_cpu = net.cpu()
    want = np.stack([_manual_instance_map(net_cpu, x.cpu(), (r, c)) for r, c in peaks.tolist()])
    assert (want.reshape(len(peaks), -1).max(axis=1) > 0).sum() >= 2  # a non-trivial case
    np.testing.assert_allclose(maps.cpu().double().numpy(), want, rtol=1e-4,
                               atol=1e-6 * want.max())


def test_chunked_equals_unchunked_and_model_left_untouched() -> None:
    net = _tiny(3)
    net.train()  # must come back in train mode
    net.saliency.bias.requires_grad_(False)  # a frozen parameter stays frozen
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(4)
    x = torch.randn(1, 3, 16, 16)
    peaks = np.array([[r, c] for r in range(8) for c in range(0, 8, 3)], np.int64)
    one = peak_backprop(net, x, peaks, chunk=1)
    many = peak_backprop(net, x, peaks, chunk=5)
    full = peak_backprop(net, x, peaks, chunk=len(peaks))
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(one, full, rtol=1e-5, atol=1e-7)
    assert all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == [True] * 5 + [False]
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any("forward" in m.__dict__ for m in net.modules())
    assert x.grad is None and not x.requires_grad
    # plain backward afterwards is the normal one again
    y = x.clone().requires_grad_(True)
    net(y).sum().backward()
    assert y.grad is not None and (y.grad < 0).any()  # PRM maps are never negative


def test_peak_backprop_restores_on_error_and_checks_inputs() -> None:
    net = _tiny(0)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError):
        peak_backprop(net, x, np.array([[4, 0]]))  # logits are 4×4
    assert not any("forward" in m.__dict__ for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError):
        peak_backprop(net, torch.randn(2, 3, 8, 8), np.array([[0, 0]]))
    with pytest.raises(ValueError):
        peak_backprop(net, x, np.array([[0, 0]]), chunk=0)
    with pytest.raises(RuntimeError), prm_backward(net):
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in net.modules())
    empty = peak_backprop(net, x, np.zeros((0, 2), np.int64))
    assert empty.shape == (0, 8, 8)


class _TupleNet(nn.Module):
    """Returns (features, logits) like CoSegNet; strided, reflect-padded, 'same' (odd and even
    kernel) and dilated convs, no ReLU — so the PRM rule conserves mass: each map sums to 1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="reflect"), nn.MaxPool2d(2),
            nn.Conv2d(6, 4, 3, padding="same", dilation=2),
            nn.Conv2d(4, 4, 2, padding="same"))  # even kernel: asymmetric padding
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.head(f)


def test_peak_backprop_generic_convs_conserve_mass() -> None:
    torch.manual_seed(0)
    net = _TupleNet()
    x = torch.randn(1, 3, 16, 16)
    peaks = np.array([[0, 0], [1, 2], [3, 3]])
    maps = peak_backprop(net, x, peaks, chunk=2)
    assert maps.shape == (3, 16, 16)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(3), rtol=1e-4, atol=1e-5)

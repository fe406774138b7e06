"""Saliency priors that stand in for SVFSal (the paper's prior, no longer obtainable).

Every method maps an RGB image to a float32 map in [0, 1] at the image's size. The registry holds
unsupervised methods (no saliency labels involved) and one clearly labelled prior trained on
generic saliency data (U²-Net-p, `trained=True`), so every run can say which setting it used.
The defaults, chosen with `benchmarks/priors.py` on coco-dev, are config values
(`CosegConfig.prior`, the presets' `prior`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from .config import DEFAULT_PRESET, PRESETS, CosegConfig
from .errors import ConfigError, InputError
from .images import as_rgb3, resize_map, shrink_to

# Methods built on superpixels or geodesic scans run at this longer side (MB+ and RBD papers use
# ~300 px); finer detail comes back through bilinear upsampling and does not change the ranking.
_INNER_MAX_SIDE = 300
# Working images are never thinner than this, so every method gets a usable grid (1×1, 5×5 and
# 20000×100 inputs are stretched up to it, the map is stretched back).
_MIN_WORK_SIDE = 16


@dataclass(frozen=True)
class SaliencyMethod:
    """One registry entry.

    Attributes:
        fn: uint8[h,w,3] RGB working image → float32[h,w] map in [0, 1].
        trained: True if the method learned from saliency (pixel) labels of other images; such a
            prior departs from the paper's fully unsupervised setting and is reported as such.
        description: one line for `--help` and benchmark tables.
    """

    fn: Callable[[np.ndarray], np.ndarray]
    trained: bool
    description: str


# --------------------------------------------------------------------------- helpers


def _normalize(m: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] as float32; a constant (or non-finite) map becomes all zeros."""
    m = np.nan_to_num(np.asarray(m, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(m.min()), float(m.max())
    if hi - lo < 1e-12:
        return np.zeros(m.shape, np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def _lab(image: np.ndarray) -> np.ndarray:
    """uint8 RGB → float32 CIE-Lab (L in 0..100, a/b roughly -128..127)."""
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


# --------------------------------------------------------------------------- OpenCV baselines


def _spectral_residual(image: np.ndarray) -> np.ndarray:
    """Hou & Zhang 2007: log-spectrum minus its local average (OpenCV contrib, 64×64 inside)."""
    sr = cv2.saliency.StaticSaliencySpectralResidual_create()
    ok, m = sr.computeSaliency(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        return np.zeros(image.shape[:2], np.float32)
    return _normalize(m)


def _fine_grained(image: np.ndarray) -> np.ndarray:
    """Montabone & Soto 2010: centre-surround differences on an integral image (OpenCV contrib)."""
    fg = cv2.saliency.StaticSaliencyFineGrained_create()
    ok, m = fg.computeSaliency(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        return np.zeros(image.shape[:2], np.float32)
    return _normalize(cv2.GaussianBlur(m.astype(np.float32), (0, 0), 2.0))


# --------------------------------------------------------------------------- MB+


def _mbd_scan(chan: np.ndarray, num_passes: int = 3) -> np.ndarray:
    """Minimum-barrier distance from the image border, by raster scanning (Zhang et al. 2015).

    Each sweep moves along one axis and updates a whole row (or column) at once from its
    predecessor, so paths are propagated in four directions per pass with O(H+W) Python steps.

    Args:
        chan: float32[H,W,C], channels treated independently.
    Returns:
        float32[H,W,C] barrier distance (max − min along the best path found).
    """
    h, w = chan.shape[:2]
    dist = np.full(chan.shape, np.inf, np.float32)
    hi = chan.copy()
    lo = chan.copy()
    dist[0], dist[-1], dist[:, 0], dist[:, -1] = 0, 0, 0, 0

    def relax(cur: tuple[slice | int, ...], prev: tuple[slice | int, ...]) -> None:
        val = chan[cur]
        nh = np.maximum(hi[prev], val)
        nl = np.minimum(lo[prev], val)
        cand = nh - nl
        better = cand < dist[cur]
        dist[cur] = np.where(better, cand, dist[cur])
        hi[cur] = np.where(better, nh, hi[cur])
        lo[cur] = np.where(better, nl, lo[cur])

    for _ in range(num_passes):
        for i in range(1, h):
            relax((i,), (i - 1,))
        for j in range(1, w):
            relax((slice(None), j), (slice(None), j - 1))
        for i in range(h - 2, -1, -1):
            relax((i,), (i + 1,))
        for j in range(w - 2, -1, -1):
            relax((slice(None), j), (slice(None), j + 1))
    return np.nan_to_num(dist, posinf=0.0)


def _boundary_contrast(lab: np.ndarray, border_frac: float = 0.1) -> np.ndarray:
    """MB+ backgroundness cue: Mahalanobis distance to each border strip's colour, combined as
    sum − max so one strip that touches the object does not veto the rest."""
    h, w = lab.shape[:2]
    bh, bw = max(1, round(h * border_frac)), max(1, round(w * border_frac))
    flat = lab.reshape(-1, 3).astype(np.float64)
    maps = []
    for strip in (lab[:bh], lab[-bh:], lab[:, :bw], lab[:, -bw:]):
        px = strip.reshape(-1, 3).astype(np.float64)
        mu = px.mean(0)
        cov = np.cov(px, rowvar=False) if len(px) > 1 else np.zeros((3, 3))
        inv = np.linalg.inv(cov + np.eye(3) * 1.0)  # regularised: flat borders have ~0 variance
        d = flat - mu
        maps.append(_normalize(np.sqrt(np.einsum("ij,jk,ik->i", d, inv, d)).reshape(h, w)))
    stack = np.stack(maps)
    return _normalize(stack.sum(0) - stack.max(0))


def _mbplus(image: np.ndarray) -> np.ndarray:
    """MB+ (Zhang et al., ICCV 2015): minimum-barrier distance to the border + boundary contrast,
    smoothed by morphological reconstruction, centre-biased and contrast-enhanced."""
    from skimage.morphology import reconstruction

    small = shrink_to(image, _INNER_MAX_SIDE, _MIN_WORK_SIDE)
    h, w = small.shape[:2]
    lab = cv2.GaussianBlur(_lab(small), (0, 0), 1.0)
    mbd = _normalize(_mbd_scan(lab).sum(axis=2))
    sal = _normalize(mbd + _boundary_contrast(lab))
    # Smoothing by reconstruction (opening then closing). MB+ uses a kernel of width
    # 50·sqrt(mean s) at 300 px; we use a radius of 15·sqrt(mean s) per 300 px of the shorter
    # side (a width ~0.6× the paper's, kept small for COCO's small objects; not tuned further).
    radius = int(max(1, round(min(h, w) / 300 * 15 * np.sqrt(float(sal.mean())))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    eroded = cv2.erode(sal, kernel)
    opened = reconstruction(eroded, sal, method="dilation")
    dilated = cv2.dilate(opened.astype(np.float32), kernel)
    closed = reconstruction(dilated, opened, method="erosion")
    sal = _normalize(closed)
    # Centre bias, as in MB+ (a broad Gaussian around the image centre)
    yy, xx = np.mgrid[:h, :w]
    centre = np.exp(-(((yy - h / 2) / (0.5 * h)) ** 2 + ((xx - w / 2) / (0.5 * w)) ** 2) / 2)
    sal = _normalize(sal * centre)
    # Contrast enhancement: sigmoid around an adaptive (Otsu) threshold, b = 10
    thresh = _otsu(sal)
    sal = _normalize(1.0 / (1.0 + np.exp(-10.0 * (sal - thresh))))
    return resize_map(sal, image.shape[:2], cv2.INTER_LINEAR)


def _otsu(m: np.ndarray) -> float:
    """Otsu threshold of a [0,1] map (0.5 if the map is constant)."""
    u8 = np.clip(m * 255, 0, 255).astype(np.uint8)
    if u8.min() == u8.max():
        return 0.5
    t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255.0


# --------------------------------------------------------------------------- superpixel graph


@dataclass(frozen=True)
class _Graph:
    labels: np.ndarray  # int[h,w] superpixel id per pixel, 0..n-1
    colour: np.ndarray  # float64[n,3] mean Lab
    centre: np.ndarray  # float64[n,2] mean (y, x) in [0,1]
    size: np.ndarray  # float64[n] pixel count
    adjacent: np.ndarray  # bool[n,n] touching superpixels (symmetric, no diagonal)
    border: list[np.ndarray]  # per side (top, bottom, left, right): ids touching that side


def _superpixels(image: np.ndarray, num_segments: int = 200) -> _Graph:
    """SLIC superpixels with mean colours, positions and adjacency (relabelled to 0..n-1)."""
    from skimage.segmentation import slic

    lab = _lab(image)
    h, w = lab.shape[:2]
    labels = slic(lab, n_segments=num_segments, compactness=10, convert2lab=False,
                  start_label=0, enforce_connectivity=True, channel_axis=-1)
    _, labels = np.unique(labels, return_inverse=True)
    labels = labels.reshape(h, w)
    n = int(labels.max()) + 1
    size = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
    colour = np.stack([np.bincount(labels.ravel(), lab[..., c].ravel(), n) for c in range(3)], 1)
    colour /= size[:, None]
    yy, xx = np.mgrid[:h, :w]
    centre = np.stack([np.bincount(labels.ravel(), (yy / max(h - 1, 1)).ravel(), n),
                       np.bincount(labels.ravel(), (xx / max(w - 1, 1)).ravel(), n)], 1)
    centre /= size[:, None]
    adjacent = np.zeros((n, n), bool)
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        diff = a != b
        adjacent[a[diff], b[diff]] = True
    adjacent |= adjacent.T
    np.fill_diagonal(adjacent, False)
    border = [np.unique(labels[0]), np.unique(labels[-1]), np.unique(labels[:, 0]),
              np.unique(labels[:, -1])]
    return _Graph(labels, colour, centre, size, adjacent, border)


def _manifold_ranking(image: np.ndarray) -> np.ndarray:
    """GMR (Yang et al., CVPR 2013): rank superpixels by similarity to the border (background
    queries), then re-rank from the resulting foreground queries."""
    small = shrink_to(image, _INNER_MAX_SIDE, _MIN_WORK_SIDE)
    g = _superpixels(small)
    n = len(g.size)
    if n < 2:
        return np.zeros(image.shape[:2], np.float32)
    # Graph: neighbours and neighbours' neighbours, and all border nodes joined to each other
    conn = g.adjacent | ((g.adjacent.astype(np.int32) @ g.adjacent.astype(np.int32)) > 0)
    bnd = np.unique(np.concatenate(g.border))
    conn[np.ix_(bnd, bnd)] = True
    np.fill_diagonal(conn, False)
    dist = np.linalg.norm(g.colour[:, None] - g.colour[None], axis=2)
    scale = dist[conn].max() if conn.any() else 1.0
    weight = np.where(conn, np.exp(-dist / (max(scale, 1e-6) * 0.1)), 0.0)
    degree = np.diag(weight.sum(1))
    affinity = np.linalg.inv(degree - 0.99 * weight + np.eye(n) * 1e-6)
    np.fill_diagonal(affinity, 0.0)  # as in the authors' code: a node does not rank itself

    sal_bg = np.ones(n)
    for side in g.border:
        y = np.zeros(n)
        y[side] = 1.0
        sal_bg *= 1.0 - _normalize(affinity @ y).astype(np.float64)
    sal_bg = _normalize(sal_bg).astype(np.float64)
    y = (sal_bg >= sal_bg.mean()).astype(np.float64)
    sal_fg = _normalize(affinity @ y)
    return resize_map(sal_fg[g.labels], image.shape[:2], cv2.INTER_LINEAR)


def _robust_background(image: np.ndarray) -> np.ndarray:
    """RBD (Zhu et al., CVPR 2014): boundary connectivity as a background probability,
    background-weighted contrast as foreground evidence, fused by a least-squares optimisation."""
    small = shrink_to(image, _INNER_MAX_SIDE, _MIN_WORK_SIDE)
    g = _superpixels(small)
    n = len(g.size)
    if n < 2:
        return np.zeros(image.shape[:2], np.float32)
    sigma_clr, sigma_bndcon, sigma_spa, mu = 10.0, 1.0, 0.25, 0.1  # the paper's constants
    dist = np.linalg.norm(g.colour[:, None] - g.colour[None], axis=2)
    # Geodesic colour distance over the adjacency graph (edge weight = Lab distance)
    edges = sparse.csr_matrix(np.where(g.adjacent, np.maximum(dist, 1e-6), 0.0))
    geo = csgraph.shortest_path(edges, method="D", directed=False)
    geo = np.nan_to_num(geo, posinf=geo[np.isfinite(geo)].max() if np.isfinite(geo).any() else 0)
    similar = np.exp(-(geo ** 2) / (2 * sigma_clr ** 2))
    area = similar.sum(1)
    on_border = np.zeros(n, bool)
    on_border[np.concatenate(g.border)] = True
    len_bnd = similar[:, on_border].sum(1)
    bndcon = len_bnd / np.sqrt(area)
    w_bg = 1.0 - np.exp(-(bndcon ** 2) / (2 * sigma_bndcon ** 2))
    # Background-weighted contrast
    spa = np.linalg.norm(g.centre[:, None] - g.centre[None], axis=2)
    w_spa = np.exp(-(spa ** 2) / (2 * sigma_spa ** 2))
    w_ctr = (dist * w_spa * w_bg[None]).sum(1)
    w_fg = _normalize(w_ctr).astype(np.float64)
    # Optimisation: min Σ w_bg s² + Σ w_fg (1−s)² + Σ_adj w_ij (s_i − s_j)²
    w_smooth = np.where(g.adjacent, np.exp(-(dist ** 2) / (2 * sigma_clr ** 2)) + mu, 0.0)
    lap = np.diag(w_smooth.sum(1)) - w_smooth
    system = np.diag(w_bg + w_fg) + lap + np.eye(n) * 1e-9
    sal = np.linalg.solve(system, w_fg)
    return resize_map(_normalize(sal)[g.labels], image.shape[:2], cv2.INTER_LINEAR)


# --------------------------------------------------------------------------- fusion

# Members of `fusion`, chosen on coco-dev (3 images per category, 108 images, every subset of the
# five unsupervised maps averaged): spectral_residual + mbplus had the best max F-β (0.255, tied
# with adding gmr), the best AUC (0.728) and half the cost of the 3-map mixes; rbd+mbplus+gmr had
# 0.246, mbplus alone 0.248. Each map is min-max normalised per image before averaging.
FUSION_MEMBERS: tuple[str, ...] = ("spectral_residual", "mbplus")


def _fusion(image: np.ndarray) -> np.ndarray:
    """Mean of per-image normalised unsupervised maps (SVFSal likewise starts from a fusion of
    weak unsupervised maps)."""
    maps = [METHODS[name].fn(image) for name in FUSION_MEMBERS]
    h, w = image.shape[:2]
    return _normalize(np.mean([resize_map(m, (h, w), cv2.INTER_LINEAR) for m in maps],
                              axis=0))


# --------------------------------------------------------------------------- U²-Net-p (trained)

_U2NET_SIZE = 320  # the network's input size (rembg)
_U2NET_THREADS = 2  # fixed so results and timings do not depend on the machine's core count


@functools.lru_cache(maxsize=1)
def _u2netp_session():  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    from .u2netp import ensure_u2netp

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _U2NET_THREADS
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(ensure_u2netp()), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def _u2netp(image: np.ndarray) -> np.ndarray:
    """U²-Net-p (Qin et al. 2020) saliency, as rembg runs it: 320×320, ImageNet normalisation,
    output 0 (the fused map, as rembg reads it), min-max normalised. Trained on DUTS saliency
    labels of other images (class-agnostic)."""
    session = _u2netp_session()
    h, w = image.shape[:2]
    x = cv2.resize(image, (_U2NET_SIZE, _U2NET_SIZE), interpolation=cv2.INTER_AREA
                   if max(h, w) > _U2NET_SIZE else cv2.INTER_CUBIC).astype(np.float32)
    x /= max(float(x.max()), 1e-6)
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225],
                                                                      np.float32)
    inp = {session.get_inputs()[0].name: x.transpose(2, 0, 1)[None].astype(np.float32)}
    pred = session.run(None, inp)[0][0, 0]
    return resize_map(_normalize(pred), (h, w), cv2.INTER_LINEAR)


# Members of `fusion_u2netp`: the trained map averaged with the unsupervised fusion's members. On
# the same 108-image coco-dev subset: max F-β 0.289 vs 0.267 for u2netp alone and 0.255 for fusion.
FUSION_U2NETP_MEMBERS: tuple[str, ...] = ("u2netp", *FUSION_MEMBERS)


def _fusion_u2netp(image: np.ndarray) -> np.ndarray:
    """Mean of the normalised U²-Net-p map and the unsupervised fusion members' maps (trained)."""
    h, w = image.shape[:2]
    maps = [resize_map(METHODS[name].fn(image), (h, w), cv2.INTER_LINEAR)
            for name in FUSION_U2NETP_MEMBERS]
    return _normalize(np.mean(maps, axis=0))


# --------------------------------------------------------------------------- registry

METHODS: dict[str, SaliencyMethod] = {
    "spectral_residual": SaliencyMethod(
        _spectral_residual, False, "spectral residual (Hou & Zhang 2007), OpenCV contrib"),
    "fine_grained": SaliencyMethod(
        _fine_grained, False, "fine-grained centre-surround (Montabone & Soto 2010), OpenCV"),
    "mbplus": SaliencyMethod(
        _mbplus, False, "MB+: minimum barrier distance + boundary contrast (Zhang et al. 2015)"),
    "gmr": SaliencyMethod(
        _manifold_ranking, False, "graph manifold ranking on SLIC superpixels (Yang et al. 2013)"),
    "rbd": SaliencyMethod(
        _robust_background, False, "robust background detection (Zhu et al. 2014)"),
    "fusion": SaliencyMethod(
        _fusion, False, "mean of normalised " + ", ".join(FUSION_MEMBERS) + " maps"),
    "u2netp": SaliencyMethod(
        _u2netp, True, "U²-Net-p ONNX, TRAINED on DUTS saliency labels (rembg's u2netp)"),
    "fusion_u2netp": SaliencyMethod(
        _fusion_u2netp, True, "mean of normalised u2netp (TRAINED), " + ", ".join(FUSION_MEMBERS)
        + " maps"),
}

# Config fields that change a prior (the stage cache key holds these and the image's hash).
CONFIG_FIELDS = ("prior", "work_max_side")
# The defaults are config values, where their measurements (benchmarks/priors.py) are recorded:
DEFAULT_METHOD = PRESETS[DEFAULT_PRESET].prior  # best overall (uses a trained prior)
DEFAULT_UNSUPERVISED = CosegConfig.prior  # best unsupervised (the paper's setting)


def get_method(name: str) -> SaliencyMethod:
    """Registry lookup.

    Raises:
        ConfigError: unknown name (the message lists the choices).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown saliency method {name!r}; choose from {sorted(METHODS)}"
                          ) from None


def _as_rgb8(image: np.ndarray) -> np.ndarray:
    if np.asarray(image).dtype != np.uint8:
        raise InputError(f"saliency expects a uint8 image, got {np.asarray(image).dtype}")
    return as_rgb3(image, InputError, "saliency input")


def working_size(height: int, width: int, work_max_side: int) -> tuple[int, int]:
    """(h, w) the methods run at: longer side capped at `work_max_side`, neither side below 16
    (thin or tiny images are stretched rather than handed to a method as a 1-pixel strip)."""
    s = min(1.0, work_max_side / max(height, width))
    return (max(_MIN_WORK_SIDE, round(height * s)), max(_MIN_WORK_SIDE, round(width * s)))


def compute_saliency(image: np.ndarray, cfg: CosegConfig) -> np.ndarray:
    """Saliency prior of one image at its own size.

    Args:
        image: uint8[H,W,3] RGB (uint8[H,W] grayscale is accepted).
        cfg: the run's config; only CONFIG_FIELDS are read: `prior`, a METHODS key, and
            `work_max_side`, the longer side the method runs at (the map is resized back
            bilinearly).

    Returns:
        float32[H,W] in [0, 1], finite; all zeros when the image carries no contrast.

    Raises:
        ConfigError: unknown method.
        InputError: not a uint8 image.
        WeightsError: the `u2netp` file cannot be obtained.
    """
    entry = get_method(cfg.prior)
    rgb = _as_rgb8(image)
    h, w = rgb.shape[:2]
    wh, ww = working_size(h, w, cfg.work_max_side)
    if (wh, ww) == (h, w):
        work = rgb
    else:
        interp = cv2.INTER_AREA if wh * ww < h * w else cv2.INTER_LINEAR
        work = cv2.resize(rgb, (ww, wh), interpolation=interp)
    sal = np.asarray(entry.fn(work), dtype=np.float32)
    sal = np.clip(np.nan_to_num(sal, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return np.clip(resize_map(sal, (h, w), cv2.INTER_LINEAR), 0.0, 1.0)


__all__ = ["DEFAULT_METHOD", "DEFAULT_UNSUPERVISED", "FUSION_MEMBERS", "FUSION_U2NETP_MEMBERS",
           "METHODS",
           "SaliencyMethod", "compute_saliency", "get_method", "working_size"]

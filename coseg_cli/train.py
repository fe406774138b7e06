"""Stage 1 fine-tuning: piecewise training of CoSegNet on the folder itself (paper §3.4)."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import CosegConfig
from .errors import TrainingError
from .losses import total_loss
from .model import CoSegNet, preprocess, resize_prior
from .records import Progress, TrainReport
from .runtime import atomic_write_bytes, config_key

log = logging.getLogger(__name__)

LOSS_TERMS = ("total", "saliency", "copeak", "affinity")
# `frozen_prefix` cache ceiling: the `fast` preset's (pool3, 320 px) is 1.6 MB a photo, 0.26 GB
# for 160 photos, inside the 4 GB that benchmarks/scale.py checks; an earlier split or a larger
# size on a big folder recomputes the prefix each step instead.
FROZEN_PREFIX_MAX_BYTES = 1 << 30
# Config fields that change the fine-tuned weights (device and threads only change rounding).
TRAIN_FIELDS = ("image_size", "epochs", "batch_images", "lr", "head_lr", "weight_decay",
                "lambda_copeak", "lambda_affinity", "affinity_alpha", "feature_layer",
                "freeze_until", "seed")
# 2: fine-tuning runs channels-last (same losses, other float rounding than format 1's NCHW).
CACHE_FORMAT = 2
# NHWC activations and weights during fine-tuning: oneDNN's channels-last convolutions train
# the `fast` preset (320 px, conv1–3 frozen) at 0.43–0.44 s a photo per epoch instead of
# 0.47–0.48, the paper preset (448 px, all layers) at 2.09–2.14 s instead of 2.52–2.60 (batch 6,
# 2 threads, torch 2.14.1; `benchmarks/train_speed.py`, BENCHMARKS.md "Session 11"); the losses
# agree to ~1e-6, only the float rounding differs.
TRAIN_MEMORY_FORMAT = torch.channels_last


def make_batches(num_images: int, batch_images: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch of piecewise batches: a fresh permutation cut into `batch_images` chunks.

    A chunk of odd size borrows one random image from outside it so it can be halved into
    pairs (from inside, not pairing with itself, only when the folder has no other image).

    Returns:
        Lists of image indices, each of even length >= 2.
    """
    if num_images < 2:
        raise TrainingError(f"fine-tuning needs at least 2 images, got {num_images}")
    perm = torch.randperm(num_images, generator=gen).tolist()
    batches = []
    for start in range(0, num_images, batch_images):
        batch = perm[start:start + batch_images]
        if len(batch) % 2:
            outside = [i for i in range(num_images) if i not in batch]
            pool = outside if outside else batch[:1]
            batch = batch + [pool[int(torch.randint(len(pool), (1,), generator=gen))]]
        batches.append(batch)
    return batches


def _keep(grad: torch.Tensor) -> None:
    """A gradient hook that changes nothing (see `_signal_points`)."""


@contextmanager
def _signal_points(model: torch.nn.Module) -> Iterator[None]:
    """Let Ctrl-C / SIGTERM interrupt a backward pass between pooling blocks.

    A CPU backward pass runs in C++, where a pending Python signal handler waits until it ends
    (several seconds for a batch of 6); a no-op gradient hook on each pooling output hands control
    back to the interpreter once per block, so the handler's KeyboardInterrupt stops the step
    there. Gradients are unchanged.
    """
    def on_output(_module: torch.nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(_keep)

    handles = [m.register_forward_hook(on_output) for m in model.modules()
               if isinstance(m, torch.nn.MaxPool2d)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _optimizer(model: CoSegNet, cfg: CosegConfig) -> torch.optim.Optimizer:
    """Adam over the trainable parameters: the saliency head at `head_lr` (0: `lr`), the rest
    at `lr`.

    Raises:
        TrainingError: every layer is frozen.
    """
    head = [p for p in model.saliency.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    if not head and not body:
        raise TrainingError("every layer is frozen; nothing to fine-tune")
    groups = [g for g in ({"params": body, "lr": cfg.lr},
                          {"params": head, "lr": cfg.head_lr or cfg.lr}) if g["params"]]
    # fused: one kernel over all tensors; measured 0.05 s vs 0.46 s per step (foreach 0.9 s) for
    # VGG-16's 14.7M parameters on this 2-core CPU.
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                            fused=True)


def frozen_prefix(model: CoSegNet, x_all: torch.Tensor, chunk: int, device: torch.device,
                  max_bytes: int = FROZEN_PREFIX_MAX_BYTES) -> tuple[int, torch.Tensor] | None:
    """The output of the trunk's frozen prefix (`freeze_until`, with the parameter-free layers
    that follow it) for every image, computed once. No layer in it trains and the model has
    no dropout or batch statistics, so it gives the same activations at every step, and
    recomputing them each step is wasted work: with conv1_1 … conv3_3 frozen (the `fast`
    preset) about 60 % of the forward FLOPs, with the whole trunk frozen nearly all of the
    fine-tuning's cost.

    Args:
        x_all: float32[N,3,S,S] preprocessed images (CPU). chunk: images per forward pass.
        max_bytes: no cache when the activations would take more (an early split on a large
            folder at a large size), so memory stays bounded by the batch instead.

    Returns:
        (index of the first `model.features` layer that trains, or its length when none does;
        float32[N,C,h,w] activations entering that layer, on `device`), or None when conv1_1
        trains or the cache would exceed `max_bytes`.
    """
    start = next((i for i, layer in enumerate(model.features)
                  if any(p.requires_grad for p in layer.parameters())), len(model.features))
    if start == 0:
        return None
    prefix = model.features[:start]
    parts: list[torch.Tensor] = []
    with torch.no_grad():
        for s in range(0, len(x_all), chunk):
            parts.append(prefix(x_all[s:s + chunk].to(device)))
            if s == 0 and parts[0][0].nbytes * len(x_all) > max_bytes:
                return None  # known from the first chunk, before the rest is computed
    return start, torch.cat(parts)


def _step(model: CoSegNet, opt: torch.optim.Optimizer, x: torch.Tensor, pri: torch.Tensor,
          cfg: CosegConfig, epoch: int, step: int, start: int = 0) -> dict[str, float]:
    """One optimiser step on one batch (x: float32[B,3,S,S] images, or when `start` > 0 the
    activations entering `model.features[start]` (`frozen_prefix`); pri: float32[B,1,S,S]).

    Returns:
        The batch's value of each term in LOSS_TERMS.

    Raises:
        TrainingError: a NaN/inf loss, naming the epoch and the step (`step` is 1-based).
    """
    feats, logits = model(x, start)
    loss, parts = total_loss(feats, logits, pri, lambda_copeak=cfg.lambda_copeak,
                             lambda_affinity=cfg.lambda_affinity, alpha=cfg.affinity_alpha)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(
            f"loss became {value} at epoch {epoch}/{cfg.epochs} (step {step}); "
            f"terms: { {k: float(v.detach()) for k, v in parts.items()} }; try a lower "
            f"--lr (now {cfg.lr})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"total": value, **{k: float(v.detach()) for k, v in parts.items()}}


def finetune(
    model: CoSegNet,
    images: Sequence[np.ndarray],
    priors: Sequence[np.ndarray],
    cfg: CosegConfig,
    *,
    device: torch.device | str,
    progress: Progress | None = None,
) -> TrainReport:
    """Fine-tune `model` in place on one folder with the three losses (Adam, piecewise batches).

    Args:
        model: from `model.build_model` (its frozen layers already set from the config).
        images: uint8[H,W,3] RGB images of the folder.
        priors: float32[H,W] saliency priors in [0, 1], one per image.
        cfg: image_size, epochs, batch_images, lr, weight_decay, loss weights, seed.
        device: torch device to train on.
        progress: called after every step as ("finetune", steps done, total steps). Each
            epoch's mean losses are in the returned history and logged at DEBUG level.

    Returns:
        TrainReport with per-epoch loss history.

    Raises:
        TrainingError: fewer than 2 images, mismatched priors, or a NaN/inf loss (names the epoch).
    """
    if len(images) != len(priors):
        raise TrainingError(f"{len(images)} images but {len(priors)} priors")
    dev = torch.device(device)
    size = cfg.image_size
    # Preprocess once, in the training layout; batches are sliced from these (slicing, indexing
    # and the frozen prefix's convolutions keep the layout, so no step converts again).
    x_all = preprocess(images, size).contiguous(memory_format=TRAIN_MEMORY_FORMAT)
    p_all = torch.stack([resize_prior(p, size) for p in priors])[:, None]
    gen = torch.Generator().manual_seed(cfg.seed)
    # the weights go back to the standard layout on the way out, even when training fails, so
    # that stage 2, the cache file and `state_digest` never see the training layout
    model.to(dev, memory_format=TRAIN_MEMORY_FORMAT).train()
    try:
        report = _train_epochs(model, x_all, p_all, cfg, dev, gen, len(images), progress)
    finally:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return report


def _train_epochs(model: CoSegNet, x_all: torch.Tensor, p_all: torch.Tensor, cfg: CosegConfig,
                  dev: torch.device, gen: torch.Generator, num_images: int,
                  progress: Progress | None) -> TrainReport:
    """`finetune`'s loop over epochs and batches, on a model already on `dev` in train mode."""
    opt = _optimizer(model, cfg)
    t0 = time.perf_counter()
    cached = frozen_prefix(model, x_all, cfg.batch_images, dev)
    start, x_all = cached if cached is not None else (0, x_all)
    total_steps = math.ceil(num_images / cfg.batch_images) * cfg.epochs
    report = TrainReport(device=str(dev))
    step = 0
    with _signal_points(model):
        for epoch in range(1, cfg.epochs + 1):
            sums = dict.fromkeys(LOSS_TERMS, 0.0)
            batches = make_batches(num_images, cfg.batch_images, gen)
            for batch in batches:
                idx = torch.tensor(batch)
                terms = _step(model, opt, x_all[idx.to(x_all.device)].to(dev, non_blocking=True),
                              p_all[idx].to(dev, non_blocking=True), cfg, epoch, step + 1,
                              start)
                step += 1
                for k, v in terms.items():
                    sums[k] += v
                if progress is not None:
                    progress("finetune", step, total_steps)
            report.history.append({k: v / len(batches) for k, v in sums.items()})
            log.debug("epoch %d/%d: %s", epoch, cfg.epochs,
                      " ".join(f"{k}={v:.4g}" for k, v in report.history[-1].items()))
    report.steps = step
    report.seconds = time.perf_counter() - t0
    return report


def state_digest(model: torch.nn.Module) -> str:
    """SHA-1 of the model's tensors (names, shapes, bytes): identifies the starting weights."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def priors_digest(priors: Sequence[np.ndarray]) -> str:
    """SHA-1 of the priors' float32 values (the prior method and its settings are in here)."""
    h = hashlib.sha1()
    for p in priors:
        a = np.ascontiguousarray(p, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def train_cache_key(image_sha1s: Sequence[str], cfg: CosegConfig, weights_sha: str = "",
                    priors_sha: str = "") -> str:
    """Cache key of fine-tuned weights: sorted image hashes + training fields + start weights.

    Args:
        image_sha1s: SHA-1 of each image's bytes (order does not matter).
        cfg: the run's config (only TRAIN_FIELDS count).
        weights_sha: digest of the starting weights (`state_digest`).
        priors_sha: digest of the priors (`priors_digest`).
    """
    fields = {name: getattr(cfg, name) for name in TRAIN_FIELDS}
    return config_key("finetune", CACHE_FORMAT, sorted(image_sha1s), fields, weights_sha,
                      priors_sha)


def load_or_finetune(
    model: CoSegNet,
    images: Sequence[np.ndarray],
    priors: Sequence[np.ndarray],
    image_sha1s: Sequence[str],
    cfg: CosegConfig,
    *,
    device: torch.device | str,
    cache_dir: Path | None,
    progress: Progress | None = None,
) -> TrainReport:
    """`finetune`, unless `cache_dir` already holds the result for this folder and config.

    The cache file `<cache_dir>/<key>.pt` holds the full state dict and the loss history; it
    is written atomically and read with `torch.load(weights_only=True)`.

    Raises:
        TrainingError: as `finetune`, or an unreadable cache file.
    """
    if cache_dir is None:
        return finetune(model, images, priors, cfg, device=device, progress=progress)
    key = train_cache_key(image_sha1s, cfg, state_digest(model), priors_digest(priors))
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        try:
            blob: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(blob["state_dict"], strict=True)
        except Exception as exc:  # corrupt or foreign file: say which, do not guess  # noqa: BLE001
            raise TrainingError(f"cannot read fine-tuning cache {path}: {exc}; delete it to "
                                "retrain") from None
        model.to(torch.device(device)).eval()
        return TrainReport(history=list(blob["history"]), steps=0, seconds=float(blob["seconds"]),
                           device=str(device), cached=True, cache_path=str(path))
    report = finetune(model, images, priors, cfg, device=device, progress=progress)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # Serialised in memory first: torch.save reports a failed write (disk full) as RuntimeError,
    # the plain write below as OSError, which atomic_write_bytes turns into one clear line.
    buffer = io.BytesIO()
    torch.save({"key": key, "state_dict": state, "history": report.history,
                "seconds": report.seconds, "steps": report.steps}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    report.cache_path = str(path)
    return report


__all__ = [
    "LOSS_TERMS",
    "TrainReport",
    "finetune",
    "frozen_prefix",
    "load_or_finetune",
    "make_batches",
    "priors_digest",
    "state_digest",
    "train_cache_key",
]

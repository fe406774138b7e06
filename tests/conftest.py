"""Shared fixtures: the real data folder (skips cleanly when absent) and small image makers."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "coco-dev"

# Tests never download: weights come from the cache that `coseg weights` prepared.
os.environ["COSEG_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def coco_dev() -> Path:
    """Root of ../shared/data/coco-dev; tests that need it skip where it is absent."""
    if not (SHARED_DATA / "apple" / "annotations.json").is_file():
        pytest.skip("real data ../shared/data/coco-dev not present")
    return SHARED_DATA


def blob_image(size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8[size,size,3]: plain grey background with two distinct coloured discs."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 120, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for cy, cx, colour in ((size * 0.3, size * 0.3, (220, 40, 40)),
                           (size * 0.7, size * 0.68, (30, 40, 210))):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size * 0.14) ** 2
        img[disc] = colour
    noise = rng.integers(-3, 4, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def global_state() -> dict[str, object]:
    """The process-wide settings a library call must leave as it found them: torch's threads,
    determinism flags and random state, python's and numpy's random state, $CUBLAS_WORKSPACE_CONFIG
    and the socket timeout (comparable with ==)."""
    import random
    import socket

    import torch

    np_state = np.random.get_state()
    return {
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "socket_timeout": socket.getdefaulttimeout(),
        "random": random.getstate(),
        "numpy": (np_state[0], np_state[1].tobytes(), *np_state[2:]),
        "torch_rng": torch.get_rng_state().numpy().tobytes(),
    }


@pytest.fixture
def unusual_state(monkeypatch):
    """Global settings unlike any a run applies (1 thread, cudnn.benchmark on, no CUBLAS
    variable, a 7.5 s socket timeout, seeded random states), so a leak changes them; the
    test's own changes are undone afterwards."""
    import random
    import socket

    import torch

    saved = (torch.get_num_threads(), torch.backends.cudnn.benchmark, socket.getdefaulttimeout(),
             torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.set_num_threads(1)
    torch.backends.cudnn.benchmark = True
    torch.use_deterministic_algorithms(False)
    socket.setdefaulttimeout(7.5)
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)
    yield
    torch.set_num_threads(saved[0])
    torch.backends.cudnn.benchmark = saved[1]
    socket.setdefaulttimeout(saved[2])
    torch.use_deterministic_algorithms(saved[3], warn_only=saved[4])


@pytest.fixture(scope="session")
def weights_ready() -> None:
    """Skip (with the fix in the reason) where `coseg weights` has not prepared VGG-16."""
    from coseg_cli import weights
    from coseg_cli.errors import WeightsError

    try:
        weights.load_vgg16_features(None, allow_download=False)
    except WeightsError as exc:
        pytest.skip(f"VGG-16 weights not prepared (run `coseg weights`): {exc}")


def manifest_text(names: list[str], *, category: str = "object",
                  instances_per_image: list[int] | None = None,
                  cosaliency_mean: list[float] | None = None) -> str:
    """manifest.json of a faked run over images `names`, built and serialised through
    coseg_cli.manifest exactly as `coseg run` writes one (so readers accept it)."""
    from coseg_cli.config import preset_config
    from coseg_cli.manifest import Counts, InputFile, Manifest

    per_image = instances_per_image if instances_per_image is not None else [0] * len(names)
    means = cosaliency_mean if cosaliency_mean is not None else [0.5] * len(names)
    manifest = Manifest(
        config=preset_config(), category=category, input_folder="/data/in",
        inputs=tuple(InputFile(n, "0" * 40, 100, 60, 80) for n in names),
        environment={"coseg": "0.1.0", "device": "cpu", "cuda_device": None},
        weights=None, prior_trained=True, cache_hits={}, train=None,
        timings_s={"prior": 0.5, "train": 3.2, "total": 4.0},
        counts=Counts(len(names), sum(per_image), tuple(per_image), tuple(means)),
        started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), skipped_files=(), seconds=4.0)
    return json.dumps(manifest.to_json())

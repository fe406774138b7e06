"""Plain records passed between stages (no behaviour beyond small conveniences)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """One loaded input image.

    Attributes:
        path: file on disk. name: path relative to the input folder (posix), used as file_name.
        image: uint8[H,W,3] RGB with EXIF orientation applied. sha1: hex digest of the file bytes.
    """

    path: Path
    name: str
    image: np.ndarray
    sha1: str

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass
class ProposalSet:
    """Candidate masks for one image.

    Attributes:
        masks: bool[N,H,W] at the image's resolution. scores: float32[N], higher is better.
        sources: per-proposal source tag (e.g. "hier", "saliency").
    """

    masks: np.ndarray
    scores: np.ndarray
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def filter(self, keep: np.ndarray) -> ProposalSet:
        """Subset by a bool mask or an index array (SAM's MaskData.filter idiom)."""
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep
        return ProposalSet(self.masks[idx], self.scores[idx], [self.sources[i] for i in idx]
                           if self.sources else [])


@dataclass(frozen=True)
class Instance:
    """One predicted instance.

    Attributes:
        image_index: index into RunResult.images. mask: bool[H,W] at image resolution.
        score: ranking score R (eq. 7). peak_xy: (x, y) of its co-saliency peak in image pixels.
        rank: 1-based rank by score within its image.
        embedding: float32[C] unit-norm fine-tuned feature of the instance (for matches.json).
    """

    image_index: int
    mask: np.ndarray
    score: float
    peak_xy: tuple[int, int]
    rank: int
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass
class RunResult:
    """Everything `cosegment` computed for one folder; `export.write_all` writes it."""

    images: list[ImageRecord]
    instances: list[Instance]
    cosaliency: list[np.ndarray]  # float32[H,W] in [0,1] per image
    config: dict[str, Any]
    environment: dict[str, Any]
    timings: dict[str, float]
    category: str = "object"
    # weights source/sha256, prior kind, cache hits, training report
    info: dict[str, Any] = field(default_factory=dict)
    peaks: list[np.ndarray] = field(default_factory=list)  # int64[K,2] (x, y) image px, per image

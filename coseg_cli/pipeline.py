"""Orchestration only: priors → proposals → fine-tuning → stage 2 per image (instances.py) →
folder-wide selection; with `self_train_rounds`, fine-tuning → stage 2 → selection again on
targets made from the last selection (selftrain.py). Each stage's result is cached under a key
built from the config fields the stage declares (its module's CONFIG_FIELDS) and the keys of the
stages it consumes, so a re-run resumes where the last one stopped and a changed option
recomputes what it changes.

Each image's co-saliency map and instances go to a sink (records.ResultSink) as soon as they are
final: across the folder only what the folder-wide step needs is held (candidate scores and
embeddings) plus the candidates' masks as RLE at working resolution, so memory does not grow
with the folder by masks and maps (`cosegment_into`; `cosegment` collects them in memory)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import coco, saliency, selftrain, train, weights
from . import instances as instances_mod
from . import model as model_mod
from . import peaks as peaks_mod
from . import proposals as proposals_mod
from .config import CosegConfig, preset_config
from .errors import InputError
from .images import load_folder, resize_map, working_copy
from .manifest import Counts, InputFile, Manifest
from .records import (
    ImageRecord,
    Instance,
    MemorySink,
    Progress,
    ProposalSet,
    ResultSink,
    RunResult,
    RunSummary,
)
from .runtime import (
    StageCache,
    config_key,
    environment_record,
    resolve_device,
    run_settings,
    sha1_bytes,
)

# Bump when a stage's code changes what it computes; its entries and those downstream are then
# recomputed (every key holds the keys of the stages it consumes).
CACHE_VERSION = {"prior": 1, "proposals": 3, "instances": 6}


def _fields(cfg: CosegConfig, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in names}


def prior_key(sha: str, cfg: CosegConfig) -> str:
    return config_key("prior", CACHE_VERSION["prior"], sha,
                      _fields(cfg, saliency.CONFIG_FIELDS))


def proposals_key(sha: str, cfg: CosegConfig) -> str:
    return config_key("proposals", CACHE_VERSION["proposals"], prior_key(sha, cfg),
                      _fields(cfg, proposals_mod.CONFIG_FIELDS))


def instances_key(sha: str, cfg: CosegConfig, model_key: str) -> str:
    """`model_key`: the fine-tuned weights' digest (train.state_digest), which every training
    field, the priors and the starting weights determine."""
    return config_key("instances", CACHE_VERSION["instances"], proposals_key(sha, cfg),
                      model_key, _fields(cfg, instances_mod.CONFIG_FIELDS))


def upscale_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool[h,w] → bool[H,W] with smooth edges (bilinear, then ≥ 0.5)."""
    if mask.shape == shape:
        return mask
    return resize_map(mask.astype(np.float32), shape, cv2.INTER_LINEAR) >= 0.5


def _notify(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def compute_priors(works: list[np.ndarray], sha1s: list[str], cfg: CosegConfig,
                   cache: StageCache, progress: Progress | None = None) -> list[np.ndarray]:
    """Saliency prior per image, float32[h,w] in [0,1] at working resolution."""
    priors = []
    for i, (img, sha) in enumerate(zip(works, sha1s)):
        key = prior_key(sha, cfg)
        hit = cache.load("prior", key)
        if hit is None:
            prior = saliency.compute_saliency(img, cfg)
            cache.save("prior", key, prior=prior.astype(np.float32))
        else:
            prior = hit["prior"].astype(np.float32)
        priors.append(prior.astype(np.float32))
        _notify(progress, "prior", i + 1, len(works))
    return priors


def compute_proposals(img: np.ndarray, prior: np.ndarray, sha: str, cfg: CosegConfig,
                      cache: StageCache, pending: Future[ProposalSet] | None = None
                      ) -> ProposalSet:
    """The image's proposals at working resolution, as atoms (cached: the atom map and the
    bit-packed membership; a hit unpacks ~10 MB instead of painting ~300 MB of masks).

    Args:
        pending: the same proposals being generated in a worker thread (`_ProposalPrefetch`),
            awaited instead of generating them here on a cache miss.
    """
    key = proposals_key(sha, cfg)
    hit = cache.load("proposals", key)
    if hit is not None:
        if pending is not None:
            pending.cancel()
        n, num_atoms = (int(v) for v in hit["shape"])
        members = np.unpackbits(hit["members"], axis=-1, count=num_atoms).astype(bool)
        return ProposalSet(hit["atom_map"], members.reshape(n, num_atoms),
                           hit["scores"], [str(t) for t in hit["sources"]])
    props = (pending.result() if pending is not None
             else proposals_mod.generate_proposals(img, cfg, prior=prior))
    cache.save("proposals", key, atom_map=props.atom_map, scores=props.scores,
               shape=np.array(props.members.shape), members=np.packbits(props.members, axis=-1),
               sources=np.array(props.sources, dtype=str))  # N may be 0
    return props


def finetuned_model(works: list[np.ndarray], priors: list[np.ndarray], sha1s: list[str],
                    cfg: CosegConfig, device: Any, cache_dir: Path | None,
                    weights_path: Path | None = None, progress: Progress | None = None
                    ) -> tuple[model_mod.CoSegNet, train.TrainReport, weights.WeightsInfo]:
    """Stage 1: the folder's fine-tuned network (from `<cache_dir>/model` when cached), in
    eval mode on `device`, with its training report and the starting weights' provenance."""
    state, winfo = weights.load_vgg16_features(weights_path)
    net = model_mod.build_model(cfg, state).to(device)
    model_cache = None if cache_dir is None else Path(cache_dir) / "model"
    report = train.load_or_finetune(net, works, priors, sha1s, cfg, device=device,
                                    cache_dir=model_cache, progress=progress)
    net.eval()
    return net, report, winfo


def as_records(images: Sequence[ImageRecord] | Sequence[np.ndarray] | Path | str,
               work_max_side: int | None = None) -> list[ImageRecord]:
    """Accept a folder, loaded records, or RGB uint8 arrays (named image_000.png, …). A folder's
    records hold working copies at `work_max_side` when given (images.load_folder), not the
    full-resolution pixels; arrays are held as given (the caller holds them anyway)."""
    if isinstance(images, (str, Path)):
        return load_folder(Path(images), work_max_side=work_max_side)[0]
    records = []
    for i, item in enumerate(images):
        if isinstance(item, ImageRecord):
            records.append(item)
            continue
        arr = np.asarray(item)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise InputError(f"image {i}: expected uint8[H,W,3] RGB, got {arr.dtype}{arr.shape}")
        records.append(ImageRecord(path=Path(f"image_{i:03d}.png"), name=f"image_{i:03d}.png",
                                   image=arr, sha1=sha1_bytes(arr.tobytes() + str(arr.shape)
                                                              .encode())))
    return records


def compute_candidates(net: model_mod.CoSegNet, img: np.ndarray, props: ProposalSet, sha: str,
                       cfg: CosegConfig, device: Any, cache: StageCache, model_key: str,
                       backprop_chunk: int = peaks_mod.BACKPROP_CHUNK) -> instances_mod.Candidates:
    """Stage 2 of one image (instances.image_stage2) on its proposals `props`,
    from the cache when the same weights (`model_key`), proposals and fields made it before."""
    key = instances_key(sha, cfg, model_key)
    hit = cache.load("instances", key)
    if hit is not None:
        return instances_mod.Candidates(**hit)
    cand = instances_mod.image_stage2(net, img, props, cfg, device, backprop_chunk)
    cache.save("instances", key, **asdict(cand))
    return cand


class _ProposalPrefetch:
    """Generates one image's proposals in a worker thread while the caller's network works on
    the previous image: proposals are CPU-only (OpenCV, numpy) and release the GIL for most of
    their time. `generate_proposals` is a pure function of the image, its prior and the
    config (its random generator is seeded from `cfg.seed`), so results equal the sequential
    order's. The worker only computes; the cache is read and written by the caller, so an
    interrupt never leaves a half-written entry behind, and `close` does not wait for it."""

    def __init__(self, works: Sequence[np.ndarray], priors: Sequence[np.ndarray],
                 sha1s: Sequence[str], cfg: CosegConfig, cache: StageCache) -> None:
        self._args = (works, priors, sha1s, cfg, cache)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coseg-proposals")
        self._pending: dict[int, Future[ProposalSet]] = {}

    def start(self, i: int) -> None:
        """Begin image `i`'s proposals unless they are cached (or `i` is past the end)."""
        works, priors, sha1s, cfg, cache = self._args
        if i >= len(works) or i in self._pending or cache.has("proposals",
                                                                proposals_key(sha1s[i], cfg)):
            return
        self._pending[i] = self._pool.submit(
            lambda: proposals_mod.generate_proposals(works[i], cfg, prior=priors[i]))

    def take(self, i: int) -> Future[ProposalSet] | None:
        """Image `i`'s proposals in flight, if `start(i)` began them."""
        return self._pending.pop(i, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _stage2(net: model_mod.CoSegNet, records: Sequence[ImageRecord], works: list[np.ndarray],
            priors: list[np.ndarray], cfg: CosegConfig, device: Any, cache: StageCache,
            sink: ResultSink | None, timings: dict[str, float], progress: Progress | None,
            backprop_chunk: int, prefetch: _ProposalPrefetch
            ) -> tuple[list[instances_mod.Candidates], list[list[coco.Rle]], list[float]]:
    """Proposals and stage 2 per image; each co-saliency map goes to `sink` (at image
    resolution) as soon as it is known (None: a self-training round before the last, whose maps
    are not results). Adds the two stages' seconds (sink excluded) to `timings`; proposals
    count the time spent waiting for them.

    Returns:
        per image: its candidates without the map (cosal float32[0,0]: the folder-wide step
        reads scores and embeddings), their masks as COCO RLE at working resolution, and the
        mean of its map at image resolution. RLE because it is lossless and its size follows
        the boundary (a few KB a mask, against h·w/8 bytes bit-packed), and because re-deriving
        the masks later would mean recomputing the proposals under --no-cache.
    """
    model_key = train.state_digest(net)  # the fine-tuned weights themselves key stage 2
    t_prop = t_inst = 0.0
    per_image: list[instances_mod.Candidates] = []
    kept: list[list[coco.Rle]] = []
    means: list[float] = []
    for i, (rec, img, prior) in enumerate(zip(records, works, priors)):
        t = time.perf_counter()
        props = compute_proposals(img, prior, rec.sha1, cfg, cache, prefetch.take(i))
        prefetch.start(i + 1)  # image i+1's proposals while the network works on image i
        t_prop += time.perf_counter() - t
        t = time.perf_counter()
        cand = compute_candidates(net, img, props, rec.sha1, cfg, device, cache, model_key,
                                  backprop_chunk)
        kept.append(coco.encode_masks(props.paint(cand.prop_idx)))
        del props  # only the kept candidates' RLE stays
        per_image.append(replace(cand, cosal=np.zeros((0, 0), np.float32)))
        cosal = None
        if sink is not None:
            cosal = cosaliency_at(cand.cosal, rec.shape)
            means.append(float(np.mean(cosal)))
        t_inst += time.perf_counter() - t
        if sink is not None:
            sink.add_cosaliency(i, cosal)
        del cosal
        _notify(progress, "instances", i + 1, len(works))
    timings["proposals"] = timings.get("proposals", 0.0) + t_prop
    timings["instances"] = timings.get("instances", 0.0) + t_inst
    return per_image, kept, means


def cosaliency_at(cosal: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """float32[h,w] co-saliency → float32[H,W] at image resolution, clipped to [0,1]."""
    full = resize_map(cosal, shape, cv2.INTER_LINEAR)  # clipped in place: 4 B/px
    return np.clip(full, 0.0, 1.0, out=None if full is cosal else full)


def image_instances(index: int, shape: tuple[int, int], work_shape: tuple[int, int],
                    cand: instances_mod.Candidates, masks_rle: Sequence[coco.Rle],
                    order: np.ndarray, scores: np.ndarray) -> list[Instance]:
    """One image's selected candidates as Instances (masks and peaks at image resolution,
    ranked from 1).

    Args:
        index: the image's index in the folder. shape: its (H, W). work_shape: (h, w) of its
            working resolution. masks_rle: its candidates' masks (RLE at working resolution).
        order, scores: indices into its candidates and their scores, best first
            (instances.select_folder).
    """
    sy, sx = shape[0] / work_shape[0], shape[1] / work_shape[1]
    out = []
    for rank, (j, score) in enumerate(zip(order, scores), start=1):
        px, py = cand.peaks_xy[j]
        out.append(Instance(
            image_index=index, mask=upscale_mask(coco.decode(masks_rle[j]), shape),
            score=float(score),
            peak_xy=(min(int(px * sx), shape[1] - 1), min(int(py * sy), shape[0] - 1)),
            rank=rank, embedding=cand.embeddings[j]))
    return out


def _send_instances(records: Sequence[ImageRecord], works: Sequence[np.ndarray],
                    per_image: Sequence[instances_mod.Candidates],
                    kept: Sequence[Sequence[coco.Rle]],
                    selected: Sequence[tuple[np.ndarray, np.ndarray]], sink: ResultSink,
                    seconds: float) -> tuple[list[int], float]:
    """Each image's selected instances to `sink`, one image at a time (`image_instances`).

    Returns:
        instances per image, and `seconds` plus the time spent building them (sink excluded).
    """
    counts = []
    for i, (rec, work, cand, rles, (order, scores)) in enumerate(
            zip(records, works, per_image, kept, selected)):
        t = time.perf_counter()
        insts = image_instances(i, rec.shape, work.shape[:2], cand, rles, order, scores)
        seconds += time.perf_counter() - t
        counts.append(len(insts))
        sink.add_instances(i, insts)
        del insts  # the sink has them: the next image's masks replace, not join, these
    return counts, seconds


def cosegment_into(images: Sequence[ImageRecord] | Sequence[np.ndarray] | Path | str,
                   cfg: CosegConfig | None, sink: ResultSink, *, cache_dir: Path | None = None,
                   weights_path: Path | None = None, category: str = "object",
                   progress: Progress | None = None,
                   backprop_chunk: int = peaks_mod.BACKPROP_CHUNK) -> RunSummary:
    """Co-segment a group of images of one category, sending each image's co-saliency map and
    instances to `sink` as soon as they are final (export.FolderWriter writes them to disk);
    writes nothing itself (cache aside).

    Across the folder it holds the inputs (for a folder, or records from
    `load_folder(..., work_max_side=cfg.work_max_side)`, only their working copies: the sink
    re-reads a photo for its overlay), what fine-tuning needs, and per image only the
    candidates' scores, embeddings, peaks and RLE masks at working resolution: no image's
    full-resolution masks or maps outlive its turn in the sink.

    Args:
        images, cfg, cache_dir, weights_path: as for `cosegment`.
        sink: receives add_cosaliency(i, float32[H,W]) for every image during stage 2, then
            add_instances(i, instances by rank) for every image, both in image order.

    Returns:
        RunSummary: the run's record and per-image counts; timings per stage (the sink's time
        excluded, "total" the call's wall time).
    """
    cfg = cfg if cfg is not None else preset_config()
    records = as_records(images, cfg.work_max_side)
    if len(records) < 2:
        raise InputError(f"co-segmentation needs at least 2 images, got {len(records)}")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    with run_settings(cfg.num_threads, cfg.seed):
        cache = StageCache(cache_dir)
        works = [working_copy(r, cfg.work_max_side) for r in records]
        sha1s = [r.sha1 for r in records]

        t = time.perf_counter()
        priors = compute_priors(works, sha1s, cfg, cache, progress)
        timings["prior"] = time.perf_counter() - t

        prefetch = _ProposalPrefetch(works, priors, sha1s, cfg, cache)
        targets = priors
        timings["train"] = timings["select"] = 0.0
        try:
            prefetch.start(0)  # the first image's proposals while the network fine-tunes
            for round_ in range(cfg.self_train_rounds + 1):
                last = round_ == cfg.self_train_rounds
                t = time.perf_counter()
                net, report, winfo = finetuned_model(works, targets, sha1s, cfg, device,
                                                     cache_dir, weights_path, progress)
                timings["train"] += time.perf_counter() - t
                per_image, kept, means = _stage2(net, records, works, priors, cfg, device,
                                                 cache, sink if last else None, timings,
                                                 progress, backprop_chunk, prefetch)
                t = time.perf_counter()
                selected = instances_mod.select_folder(per_image, cfg)
                if not last:  # the next round fine-tunes anew on what this one found
                    targets = selftrain.pseudo_labels(kept, selected,
                                                      [w.shape[:2] for w in works])
                timings["select"] += time.perf_counter() - t
        finally:
            prefetch.close()

        counts, timings["select"] = _send_instances(records, works, per_image, kept, selected,
                                                    sink, timings["select"])
        timings["total"] = time.perf_counter() - started

        return RunSummary(
            images=records, config=asdict(cfg), environment=environment_record(device),
            timings=timings, instances_per_image=counts, cosaliency_means=means,
            category=category, weights=winfo, train=report, cache_hits=dict(cache.hits),
            peaks=[c.peaks_xy for c in per_image])


def cosegment(images: Sequence[ImageRecord] | Sequence[np.ndarray] | Path | str,
              cfg: CosegConfig | None = None, *, cache_dir: Path | None = None,
              weights_path: Path | None = None, category: str = "object",
              progress: Progress | None = None,
              backprop_chunk: int = peaks_mod.BACKPROP_CHUNK) -> RunResult:
    """Co-segment a group of images of one category; writes nothing (cache aside).

    Torch's thread count, the random seeds and deterministic algorithms are set from `cfg` for
    the call and put back when it returns or raises (runtime.run_settings). Every image's masks
    and map are kept in the result; for a large folder, `cosegment_into` with a sink that writes
    them out (export.FolderWriter, what `coseg run` does) keeps memory flat.

    Args:
        images: a folder, loaded ImageRecords (images.load_folder) or uint8[H,W,3] RGB arrays;
            at least 2. cfg: the run's frozen config (default: the default preset).
        cache_dir: stage cache root (None: no caching). weights_path: explicit VGG-16 weights.

    Returns:
        RunResult with instances (masks at each image's resolution), co-saliency maps, timings.
    """
    sink = MemorySink()
    s = cosegment_into(images, cfg, sink, cache_dir=cache_dir, weights_path=weights_path,
                       category=category, progress=progress, backprop_chunk=backprop_chunk)
    return RunResult(
        images=s.images, instances=sink.instances, cosaliency=sink.cosaliency, config=s.config,
        environment=s.environment, timings=s.timings, category=s.category, weights=s.weights,
        train=s.train, cache_hits=s.cache_hits, peaks=s.peaks)


def build_manifest(result: RunResult | RunSummary, folder: Path, started_at: float, *,
                   skipped_files: Sequence[str], seconds: float) -> Manifest:
    """Everything needed to audit or replay a run (`coseg run --config manifest.json`).

    Args:
        result: what `cosegment` or `cosegment_into` returned. folder: the input folder.
            started_at: POSIX time the run started. skipped_files: one message per input skipped
            (`--skip-bad`). seconds: the run's wall time, writing included.
    """
    cfg = CosegConfig.from_dict(result.config)
    per_image = result.instances_per_image
    return Manifest(
        config=cfg,
        category=result.category,
        input_folder=str(folder),
        inputs=tuple(InputFile(r.name, r.sha1, r.path.stat().st_size if r.path.exists() else None,
                               r.height, r.width) for r in result.images),
        environment=result.environment,
        weights=result.weights,
        prior_trained=saliency.get_method(cfg.prior).trained,
        cache_hits=result.cache_hits,
        train=result.train,
        timings_s={k: round(v, 3) for k, v in result.timings.items()},
        counts=Counts(len(result.images), sum(per_image), tuple(per_image),
                      tuple(round(m, 6) for m in result.cosaliency_means)),
        started_at=datetime.fromtimestamp(started_at, UTC),
        skipped_files=tuple(skipped_files),
        seconds=seconds,
    )

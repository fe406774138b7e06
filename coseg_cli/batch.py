"""Many folders, one call: discover groups, run each (load → cosegment_into, which streams each
image's outputs to export.FolderWriter → JSON → manifest) and report a status per folder, so one
bad folder never stops the others."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import export, images, pipeline, report
from .config import CosegConfig
from .errors import ConfigError, CosegError, InputError
from .records import Progress


@dataclass(frozen=True)
class FolderOutcome:
    """What happened to one input folder (one JSON line of `coseg run --json`)."""

    folder: str
    out: str
    images: int
    instances: int
    seconds: float
    status: str  # "ok" | "error"
    error: str | None = None
    skipped: tuple[str, ...] = ()


def discover_folders(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) that directly holds at least one image."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"folder not found: {root}")
    found = [root] + sorted(p for p in root.rglob("*") if p.is_dir()
                            and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [p for p in found if images.list_images(p)]


def output_folders(folders: list[Path], out: Path) -> list[Path]:
    """One folder → OUT itself; several → OUT/<folder name> (clashing names get a suffix)."""
    if len(folders) == 1:
        return [Path(out)]
    names: list[str] = []
    for f in folders:
        name = f.resolve().name or "root"
        candidate, k = name, 2
        while candidate in names:
            candidate, k = f"{name}-{k}", k + 1
        names.append(candidate)
    return [Path(out) / n for n in names]


def parse_shard(value: str) -> tuple[int, int]:
    """"K/N" → (K, N) with 1 ≤ K ≤ N (`coseg run --shard`).

    Raises:
        ConfigError: not two integers separated by "/", or K outside 1..N.
    """
    parts = str(value).strip().split("/")
    try:
        k, n = (int(x) for x in parts)
    except ValueError:
        raise ConfigError(f"--shard must be K/N (e.g. 2/8), got {value!r}") from None
    if n < 1 or not 1 <= k <= n:
        raise ConfigError(f"--shard K/N needs 1 <= K <= N, got {value!r}")
    return k, n


def shard_indices(folders: list[Path], k: int, n: int) -> list[int]:
    """Indices into `folders` of shard K of N, in their original order.

    Folders are ranked by resolved path (the order callers list them in does not matter) and the
    i-th goes to shard (i mod N) + 1: shards differ in size by at most one, every machine computes
    the same split from the same folder list, and the N shards cover every folder exactly once.
    """
    if n < 1 or not 1 <= k <= n:
        raise ConfigError(f"shard K/N needs 1 <= K <= N, got {k}/{n}")
    ranked = sorted(range(len(folders)), key=lambda i: (str(Path(folders[i]).resolve()), i))
    return sorted(i for pos, i in enumerate(ranked) if pos % n == k - 1)


def run_folder(folder: Path, out: Path, cfg: CosegConfig, *, category: str | None = None,
               skip_bad: bool = False, use_cache: bool = True, force: bool = False,
               weights_path: Path | None = None, progress: Progress | None = None
               ) -> FolderOutcome:
    """Co-segment one folder into `out`. CosegErrors become an "error" outcome; anything else
    is a bug and propagates."""
    t0 = time.time()
    folder, out = Path(folder), Path(out)
    created = not out.exists()
    try:
        export.check_writable(out)
        # records hold working copies only; the writer re-reads each photo for its overlay
        records, skipped = images.load_folder(folder, skip_bad=skip_bad,
                                              work_max_side=cfg.work_max_side)
        cache_dir = out / "cache" if use_cache else None
        if force and cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
        name = category or folder.resolve().name or "object"
        # each image's files are written as soon as they are final (memory stays flat)
        writer = export.FolderWriter(out, records)
        result = pipeline.cosegment_into(records, cfg, writer, cache_dir=cache_dir,
                                         weights_path=weights_path, category=name,
                                         progress=progress)
        written = writer.finish(result.config, result.category)
        result.timings.update({f"write_{k}": v for k, v in written.items()})
        export.write_manifest(out, pipeline.build_manifest(
            result, folder, t0, skipped_files=skipped, seconds=time.time() - t0))
        report.write_report(out)
    except CosegError as exc:
        if created:  # a folder that failed before writing anything leaves no empty OUT behind
            try:
                out.rmdir()
            except OSError:
                pass  # not empty: keeps its cache, so a re-run resumes
        return FolderOutcome(str(folder), str(out), 0, 0, round(time.time() - t0, 3), "error",
                             str(exc))
    return FolderOutcome(str(folder), str(out), len(records), sum(result.instances_per_image),
                         round(time.time() - t0, 3), "ok", None, tuple(skipped))

"""Merge the outputs of several `coseg run` calls (shards, GNU parallel jobs) into one folder.

A per-folder result is a folder holding `instances.json` and `manifest.json` (written last, so its
presence marks a complete result). Each is placed at OUT/<name> — hard-linked when OUT is on the
same filesystem (cheap, and safe: coseg replaces files by rename, never rewrites them in place),
else copied — and swapped in whole, so an interrupted merge leaves no half folder. OUT gains an
`index.json` listing every merged folder and, when they all share one category, a combined
`instances.json` (COCO) over all their images."""

from __future__ import annotations

import errno
import filecmp
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .coco import read_dataset
from .errors import InputError
from .manifest import MANIFEST_NAME, read_manifest
from .runtime import atomic_write_json, read_json

RESULT_FILES = ("instances.json", MANIFEST_NAME)
INDEX_NAME = "index.json"
SKIPPED_DIRS = ("cache",)  # stage caches stay with the run that made them


@dataclass(frozen=True)
class ResultFolder:
    """One complete per-folder result found in a run output."""

    name: str  # folder name it gets under the merged OUT
    path: Path
    category: str
    images: int
    instances: int


@dataclass
class MergeReport:
    """What `merge_outputs` did (the CLI prints it; `index` is what index.json holds)."""

    out: Path
    added: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    linked_files: int = 0
    copied_files: int = 0
    index: dict[str, Any] = field(default_factory=dict)
    combined: bool = False  # whether OUT/instances.json was written


def _is_result(folder: Path) -> bool:
    return all((folder / f).is_file() for f in RESULT_FILES)


def read_result(folder: Path, name: str | None = None) -> ResultFolder:
    """Describe one complete result folder; `name` defaults to its category, else its own name.

    Raises:
        InputError: instances.json or manifest.json missing, not parseable or malformed.
    """
    folder = Path(folder)
    if not _is_result(folder):
        raise InputError(f"{folder} is not a complete coseg result (needs "
                         f"{' and '.join(RESULT_FILES)})")
    data = read_dataset(folder / "instances.json")
    read_manifest(folder)  # a well-formed manifest, or an InputError naming what is wrong
    listed = data.get("categories")  # optional, as for `coseg eval`: not a list = absent
    cats = [c.get("name") for c in (listed if isinstance(listed, list) else [])
            if isinstance(c, dict)]
    category = str(cats[0]) if len(cats) == 1 and cats[0] else folder.resolve().name
    return ResultFolder(name or _safe_name(category), folder, category, len(data["images"]),
                        len(data["annotations"]))


def _safe_name(category: str) -> str:
    """A category as one visible folder name: no separators, no "..", no leading dot."""
    name = category.replace("/", "_").replace("\\", "_").strip().lstrip(".")
    return name or "object"


def find_results(source: Path) -> tuple[list[ResultFolder], list[str]]:
    """Every complete result in a run output, and warnings for incomplete ones.

    A single-folder run output (instances.json + manifest.json in `source` itself) gives one
    result named after its category; otherwise each direct subfolder holding a result gives one,
    keeping its folder name (what `coseg run` named it, or an earlier merge).

    Raises:
        InputError: `source` missing, not a folder, or holding no result at all.
    """
    source = Path(source)
    if not source.is_dir():
        raise InputError(f"run output not found: {source}" if not source.exists()
                         else f"not a folder: {source}")
    if _is_result(source):
        return [read_result(source)], []
    found: list[ResultFolder] = []
    warnings: list[str] = []
    for child in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _is_result(child):
            found.append(read_result(child, child.name))
        elif (child / "instances.json").exists() or (child / "cache").is_dir():
            warnings.append(f"{child}: incomplete result (no manifest.json: failed or "
                            "interrupted run), not merged")
    if not found and not warnings:
        raise InputError(f"{source} holds no coseg results (no instances.json + manifest.json "
                         "in it or in its subfolders)")
    return found, warnings


def result_files(folder: Path) -> list[str]:
    """Relative posix paths of the files a result consists of: everything except the stage
    cache and hidden/temporary entries (`.x.part`, `.coseg-write-test`)."""
    folder = Path(folder)
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not (rel == Path(".") and d in SKIPPED_DIRS))
        files += [(rel / f).as_posix() for f in sorted(filenames)
                  if not f.startswith(".") and not f.endswith(".part")]
    return sorted(files)


def same_result(a: Path, b: Path) -> bool:
    """Whether two result folders hold the same files with the same bytes."""
    files = result_files(a)
    if files != result_files(b):
        return False
    return all(os.path.samefile(a / f, b / f) or filecmp.cmp(a / f, b / f, shallow=False)
               for f in files)


def _place(src: Path, dst: Path, link: bool) -> tuple[int, int]:
    """Fill the empty folder `dst` with `src`'s result files; returns (linked, copied)."""
    linked = copied = 0
    for rel in result_files(src):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(src / rel, target)
                linked += 1
                continue
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP,
                                     errno.EACCES):
                    raise
        shutil.copy2(src / rel, target)
        copied += 1
    return linked, copied


def _swap_in(src: Path, dest: Path, link: bool) -> tuple[int, int]:
    """Build the copy beside `dest` under a hidden name, then rename it over `dest`."""
    tmp = dest.with_name(f".{dest.name}.merge-part")
    old = dest.with_name(f".{dest.name}.merge-old")
    _remove(tmp)
    _remove(old)
    try:
        tmp.mkdir(parents=True)
        counts = _place(src, tmp, link)
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
    finally:
        _remove(tmp)
        _remove(old)
    return counts


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def combined_coco(results: list[ResultFolder]) -> dict[str, Any] | None:
    """One COCO dataset over several results of the same category, or None when categories
    differ. Images and annotations are renumbered; file_name becomes "<folder>/<file_name>"."""
    if not results or len({r.category for r in results}) != 1:
        return None
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for res in results:
        data = read_json(res.path / "instances.json", "instances")
        new_id: dict[Any, int] = {}
        for img in data["images"]:
            new_id[img["id"]] = len(images) + 1
            images.append({**img, "id": len(images) + 1,
                           "file_name": f"{res.name}/{img.get('file_name', img['id'])}"})
        for ann in data["annotations"]:
            if ann.get("image_id") not in new_id:
                raise InputError(f"{res.path / 'instances.json'}: annotation {ann.get('id')} "
                                 f"refers to unknown image_id {ann.get('image_id')!r}")
            annotations.append({**ann, "id": len(annotations) + 1,
                                "image_id": new_id[ann["image_id"]], "category_id": 1})
    category = results[0].category
    return {
        "info": {"description": f"coseg merge of {len(results)} folder(s)",
                 "folders": [r.name for r in results]},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": category, "supercategory": category}],
    }


def merge_outputs(sources: list[Path], out: Path, *, force: bool = False, link: bool = True
                  ) -> MergeReport:
    """Merge the per-folder results of several run outputs into `out`.

    Every clash is checked before anything is written: two sources giving the same name, or a
    name already in `out`, must hold identical files (then it is kept as is) unless `force`
    (the later source / the new result wins).

    Args:
        sources: `coseg run` output folders (a single-folder output, or a parent of per-folder
            outputs, or an earlier merge). out: the merged folder (may be one of the sources).
        force: replace clashing folders instead of refusing. link: hard-link where possible.

    Raises:
        InputError: a missing/empty source, `out` not a folder, or a clash without `force`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path exists and is not a folder: {out}")
    if _is_result(out):
        raise InputError(f"{out} is itself a single-folder result; merge into another folder")
    report = MergeReport(out)
    clashes: list[str] = []
    chosen = _choose(sources, force, report, clashes)
    plan = _plan(chosen, out, force, report, clashes)
    if clashes:
        raise InputError(f"{len(clashes)} clashing result folder(s), use --force to replace: "
                         + "; ".join(clashes))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {out}: {exc.strerror or exc}") from None
    previous = _previous_sources(out)
    for res, how in plan:
        try:
            linked, copied = _swap_in(res.path, out / res.name, link)
        except OSError as exc:
            raise InputError(f"cannot write {out / res.name}: {exc.strerror or exc}") from None
        report.linked_files += linked
        report.copied_files += copied
        (report.added if how == "added" else report.replaced).append(res.name)
    _write_index(out, previous | {n: str(r.path) for n, r in chosen.items()}, report)
    return report


def _choose(sources: list[Path], force: bool, report: MergeReport, clashes: list[str]
            ) -> dict[str, ResultFolder]:
    """The result each name gets among the sources: the first, or with `force` the last; a
    differing later one is a clash (appended to `clashes`) or, with `force`, a warning."""
    chosen: dict[str, ResultFolder] = {}
    for source in sources:
        found, warnings = find_results(source)
        report.warnings += warnings
        for res in found:
            prev = chosen.get(res.name)
            if prev is not None and not same_result(prev.path, res.path):
                if not force:
                    clashes.append(f"{res.name} ({prev.path} vs {res.path})")
                    continue
                report.warnings.append(f"{res.name}: {res.path} replaces {prev.path} (--force)")
            if prev is None or force:
                chosen[res.name] = res
    return chosen


def _plan(chosen: dict[str, ResultFolder], out: Path, force: bool, report: MergeReport,
          clashes: list[str]) -> list[tuple[ResultFolder, str]]:
    """What to do with each chosen result against what `out` holds: ("added" | "replaced")
    per folder to write; identical ones go to `report.identical`, differing ones without
    `force` to `clashes`."""
    plan: list[tuple[ResultFolder, str]] = []
    for name, res in chosen.items():
        dest = out / name
        if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
            plan.append((res, "added"))
        elif dest.resolve() == res.path.resolve() or (_is_result(dest)
                                                      and same_result(dest, res.path)):
            report.identical.append(name)
        elif force:
            plan.append((res, "replaced"))
        else:
            clashes.append(f"{name} (already in {out}, differs from {res.path})")
    return plan


def _write_index(out: Path, sources_by_name: dict[str, str], report: MergeReport) -> None:
    """Write OUT/index.json over every result folder now in `out` (into `report.index`) and the
    combined instances.json when they share one category (else remove a stale one)."""
    merged = [read_result(p, p.name) for p in sorted(out.iterdir())
              if p.is_dir() and not p.name.startswith(".") and _is_result(p)]
    report.index = {
        "folders": [{"name": r.name, "category": r.category, "images": r.images,
                     "instances": r.instances, "source": sources_by_name.get(r.name)}
                    for r in merged],
        "images": sum(r.images for r in merged),
        "instances": sum(r.instances for r in merged),
    }
    combined = combined_coco(merged)
    try:
        atomic_write_json(out / INDEX_NAME, report.index)
        if combined is not None:
            atomic_write_json(out / "instances.json", combined)
        else:  # categories differ now: an older combined file would be wrong
            (out / "instances.json").unlink(missing_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write {out / INDEX_NAME}: {exc.strerror or exc}") from None
    report.combined = combined is not None


def _previous_sources(out: Path) -> dict[str, str]:
    """name → source recorded by an earlier merge into `out` (kept for folders not re-merged)."""
    path = out / INDEX_NAME
    try:
        data = json.loads(path.read_text())
        return {str(f["name"]): str(f["source"]) for f in data.get("folders", [])
                if f.get("source")}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}

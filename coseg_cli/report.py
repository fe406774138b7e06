"""OUT/report.html: one self-contained page to look at a finished run — overlays, scores, the
folder's score histogram, co-saliency maps on demand and the images that likely went wrong.

Built only from what a run already wrote (instances.json, manifest.json, overlays/, cosaliency/),
so `coseg report OUT` can regenerate it at any time. Images are referenced by relative URLs, CSS
is inline, there is no script and nothing is fetched from the network: the folder can be zipped,
copied or served as is."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from urllib.parse import quote

import numpy as np

from . import export
from .coco import read_dataset
from .errors import InputError
from .manifest import Manifest, read_manifest
from .ranking import noise_threshold
from .records import TrainReport
from .runtime import atomic_write_bytes

REPORT_NAME = "report.html"
# Co-saliency outlier rule: a mean below the folder median by more than 3 robust σ (MAD scaled
# to σ for a normal; 3 is the usual robust-outlier cut) and by at least COSAL_MIN_GAP, or below
# COSAL_RATIO × the median. The gap keeps near-identical folders (the /tmp/out_bottle run: 6 means
# within 0.0003 of 0.498) from flagging invisible differences; the ratio catches a plainly dark
# image in a folder whose means spread widely.
COSAL_ROBUST_Z = -3.0
COSAL_MIN_GAP = 0.05
COSAL_RATIO = 0.5
MAD_TO_SIGMA = 1.4826
HIST_BINS = 20
MAX_SCORE_CHIPS = 12  # per gallery card; the rest are summarised as "+N more"


@dataclass(frozen=True)
class ImageSummary:
    """What the report shows for one image.

    Attributes:
        index: 0-based position in instances.json. name: input file name (relative, posix).
        stem: output file stem (overlays/<stem>.jpg, cosaliency/<stem>.png).
        scores: instance scores, best first. cosaliency_mean: mean co-saliency in [0, 1] (from
        the manifest). reasons: why it is flagged (empty: not flagged).
    """

    index: int
    name: str
    stem: str
    scores: tuple[float, ...]
    cosaliency_mean: float
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Thresholds:
    """The folder-level levels the outlier rules compared against (None: not computable)."""

    score: float | None
    cosaliency: float | None
    score_percentile: float


def find_outliers(scores: list[np.ndarray], cosal_means: Sequence[float],
                  percentile: float) -> tuple[list[tuple[str, ...]], Thresholds]:
    """Flag images with no confident instance or with co-saliency far below the folder's.

    An image has no confident instance when it has none, or when even its best score is below the
    folder's `percentile` of all instance scores: the level of the pipeline's noise filter
    (`ranking.noise_threshold`), which never empties an image, so such an image kept only a
    below-threshold survivor. Co-saliency is far below when its mean is under
    median − max(3 robust σ, COSAL_MIN_GAP), or under COSAL_RATIO × median.

    Args:
        scores: per image, float[k_i] instance scores (k_i may be 0).
        cosal_means: per image, mean co-saliency in [0, 1].
        percentile: in [0, 100); the run's `noise_percentile`.

    Returns:
        per image a tuple of human-readable reasons (empty: not flagged), and the thresholds used.
    """
    score_thresh = noise_threshold(scores, percentile)
    known = np.asarray(cosal_means, np.float64)
    cosal_thresh = None
    if known.size >= 2:
        median = float(np.median(known))
        mad = float(np.median(np.abs(known - median)))
        gap = max(-COSAL_ROBUST_Z * MAD_TO_SIGMA * mad, COSAL_MIN_GAP)
        cosal_thresh = max(median - gap, COSAL_RATIO * median)
    reasons: list[tuple[str, ...]] = []
    for s, m in zip(scores, cosal_means, strict=True):
        s = np.asarray(s, np.float64).reshape(-1)
        why: list[str] = []
        if s.size == 0:
            why.append("no instance")
        elif score_thresh is not None and float(s.max()) < score_thresh:
            why.append(f"best score {s.max():.3g} below the confidence level {score_thresh:.3g}")
        if cosal_thresh is not None and m < cosal_thresh:
            why.append(f"co-saliency mean {m:.3f} < {cosal_thresh:.3f}")
        reasons.append(tuple(why))
    return reasons, Thresholds(score_thresh, cosal_thresh, percentile)


def summarize(out_dir: Path) -> tuple[Manifest, list[ImageSummary], Thresholds]:
    """Read one output folder into per-image summaries (with outlier flags).

    Raises:
        InputError: instances.json or manifest.json is missing or malformed, or they disagree
            on the number of images.
    """
    out_dir = Path(out_dir)
    coco_path = out_dir / "instances.json"
    coco_data = read_dataset(coco_path)
    try:
        images = sorted(coco_data["images"], key=lambda im: int(im["id"]))
        names = [str(im["file_name"]) for im in images]
        position = {int(im["id"]): i for i, im in enumerate(images)}
        per_image: list[list[float]] = [[] for _ in images]
        for ann in coco_data["annotations"]:
            per_image[position[int(ann["image_id"])]].append(float(ann["score"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{coco_path} is not a coseg COCO file: {exc!r}") from None
    manifest = read_manifest(out_dir)
    means = manifest.counts.cosaliency_mean
    if len(means) != len(names):
        raise InputError(f"{out_dir / 'manifest.json'} counts {len(means)} image(s) but "
                         f"{coco_path} holds {len(names)}")
    stems = export.output_stems(names)
    scores = [np.array(sorted(s, reverse=True)) for s in per_image]
    reasons, thresholds = find_outliers(scores, means, manifest.config.noise_percentile)
    rows = zip(names, stems, scores, means, reasons, strict=True)
    summaries = [ImageSummary(i, n, st, tuple(float(v) for v in s), m, r)
                 for i, (n, st, s, m, r) in enumerate(rows)]
    return manifest, summaries, thresholds


def score_histogram_svg(scores: np.ndarray, *, bins: int = HIST_BINS,
                        marker: float | None = None, width: int = 560, height: int = 180) -> str:
    """Inline SVG bar chart of instance scores (no script, scales with the page).

    Args:
        scores: float[N], any range; N may be 0. marker: a score to draw as a dashed line.
    """
    e = html.escape
    scores = np.asarray(scores, np.float64).reshape(-1)
    scores = scores[np.isfinite(scores)]
    left, right, top, bottom = 40, 12, 12, 34
    pw, ph = width - left - right, height - top - bottom
    head = (f'<svg class="hist" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="histogram of {scores.size} instance scores" '
            f'xmlns="http://www.w3.org/2000/svg">')
    if scores.size == 0:
        return (head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
                'class="muted">no instances</text></svg>')
    lo, hi = float(scores.min()), float(scores.max())
    if marker is not None and math.isfinite(marker):
        lo, hi = min(lo, marker), max(hi, marker)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(scores, bins=bins, range=(lo, hi))
    ymax = max(1, int(counts.max()))
    parts = [head, (f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" '
                    'class="axis"/>')]
    for k, v in enumerate(sorted({0, (ymax + 1) // 2, ymax})):  # integer y grid
        y = top + ph - ph * v / ymax
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                     f'{v:g}</text>')
        if k:
            parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" '
                         'class="grid"/>')
    bw = pw / bins
    for k, c in enumerate(counts):
        if c == 0:
            continue
        h = ph * c / ymax
        parts.append(f'<rect class="bar" x="{left + k * bw + 1:.1f}" y="{top + ph - h:.1f}" '
                     f'width="{max(bw - 2, 1):.1f}" height="{h:.1f}"><title>'
                     f'{e(f"{edges[k]:.3g} – {edges[k + 1]:.3g}: {c}")}</title></rect>')
    for k in range(0, bins + 1, max(1, bins // 5)):  # x ticks at every 4th edge
        x = left + k * bw
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle" class="tick">'
                     f'{edges[k]:.3g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 2}" text-anchor="middle" '
                 'class="tick">instance score</text>')
    if marker is not None and math.isfinite(marker):
        x = left + pw * (marker - lo) / (hi - lo)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" '
                     f'class="marker"><title>{e(f"confidence level {marker:.3g}")}</title></line>')
    parts.append("</svg>")
    return "".join(parts)


def _url(*parts: str) -> str:
    """A relative URL to a file in the output folder, percent-encoded and attribute-escaped."""
    return html.escape("/".join(quote(p, safe="") for p in parts), quote=True)


def _fmt_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _loss_trend(train: TrainReport | None) -> str | None:
    """"first → last (N steps)" of the fine-tuning total loss, or None when not recorded."""
    totals = [] if train is None else [h["total"] for h in train.history]
    if not totals:
        return None
    return f"{totals[0]:.4g} → {totals[-1]:.4g} ({len(totals)} steps)"


def _card(im: ImageSummary, out_dir: Path) -> str:
    e = html.escape
    n = len(im.scores)
    flagged = " flagged" if im.reasons else ""
    overlay = out_dir / "overlays" / f"{im.stem}.jpg"
    if overlay.is_file():
        picture = (f'<a href="{_url("overlays", im.stem + ".jpg")}"><img class="overlay" '
                   f'src="{_url("overlays", im.stem + ".jpg")}" alt="{e(im.name)}" '
                   'loading="lazy"></a>')
    else:
        picture = '<div class="missing">no overlay written</div>'
    chips = "".join(f'<span class="chip">{s:.3g}</span>' for s in im.scores[:MAX_SCORE_CHIPS])
    if n > MAX_SCORE_CHIPS:
        chips += f'<span class="more">+{n - MAX_SCORE_CHIPS} more</span>'
    cosal = f' · co-saliency {im.cosaliency_mean:.2f}'
    flags = "".join(f'<li>{e(r)}</li>' for r in im.reasons)
    cosal_png = out_dir / "cosaliency" / f"{im.stem}.png"
    details = (f'<details><summary>co-saliency map</summary><img class="cosal" '
               f'src="{_url("cosaliency", im.stem + ".png")}" alt="co-saliency of {e(im.name)}" '
               'loading="lazy"></details>') if cosal_png.is_file() else ""
    return (f'<figure class="card{flagged}" id="img-{im.index + 1}">{picture}<figcaption>'
            f'<div class="name" title="{e(im.name)}">{e(im.name)}</div>'
            f'<div class="meta"><b>{n}</b> instance{"" if n == 1 else "s"}{cosal}</div>'
            f'<div class="chips">{chips}</div>'
            + (f'<ul class="why">{flags}</ul>' if flags else "")
            + f'{details}</figcaption></figure>')


_CSS = """
:root{--fg:#1d2430;--muted:#667085;--line:#e3e7ee;--bg:#f6f7f9;--card:#fff;--accent:#2f6fdf;
--bad:#c62828;--badbg:#fdecea}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
color:var(--fg);background:var(--bg)}
header,main{max-width:1400px;margin:0 auto;padding:20px 24px}
header{padding-bottom:4px}
h1{font-size:24px;margin:0 0 2px}h1 .cat{color:var(--accent)}
h2{font-size:18px;margin:28px 0 10px}
.sub{color:var(--muted);margin:0 0 14px;word-break:break-all}
.stats{display:flex;flex-wrap:wrap;gap:10px;margin:0 0 12px;padding:0;list-style:none}
.stats li{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 14px}
.stats b{display:block;font-size:20px}.stats span{color:var(--muted);font-size:13px}
.stats li.bad{border-color:var(--bad);background:var(--badbg)}.stats li.bad b{color:var(--bad)}
.panels{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:16px}
@media (max-width:900px){.panels{grid-template-columns:1fr}}
.panel{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px}
.panel h3{margin:0 0 8px;font-size:15px}
table.kv{border-collapse:collapse;width:100%;font-size:14px}
table.kv td{padding:3px 8px 3px 0;vertical-align:top;border-bottom:1px solid var(--line)}
table.kv td:first-child{color:var(--muted);white-space:nowrap;width:40%}
.hist{width:100%;height:auto;display:block}
.hist .bar{fill:var(--accent)}.hist .axis{stroke:#98a2b3}.hist .grid{stroke:var(--line)}
.hist .tick{font-size:11px;fill:var(--muted)}.hist .muted{fill:var(--muted)}
.hist .marker{stroke:var(--bad);stroke-width:2;stroke-dasharray:5 4}
.legend{color:var(--muted);font-size:13px;margin:6px 0 0}
.legend i{display:inline-block;width:18px;border-top:2px dashed var(--bad);margin:0 4px 3px 0}
.outliers{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:4px 0;
margin:0}
.outliers li{list-style:none;padding:6px 16px;border-bottom:1px solid var(--line)}
.outliers li:last-child{border-bottom:0}
.outliers a{color:var(--bad);font-weight:600;text-decoration:none;word-break:break-all}
.ok{color:#2e7d32}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:14px}
.card{margin:0;background:var(--card);border:1px solid var(--line);border-radius:8px;
overflow:hidden;display:flex;flex-direction:column}
.card.flagged{border:2px solid var(--bad)}
.card img{display:block;width:100%;height:auto;background:#eee}
.card .overlay{aspect-ratio:4/3;object-fit:contain;background:#111}
.missing{aspect-ratio:4/3;display:flex;align-items:center;justify-content:center;
color:var(--muted);background:#eee}
figcaption{padding:8px 10px 10px;font-size:13px}
.name{font-weight:600;font-size:14px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.meta{color:var(--muted);margin:2px 0 4px}.meta b{color:var(--fg)}
.chips{display:flex;flex-wrap:wrap;gap:4px}
.chip{background:#eef3fd;color:#1f4fa8;border-radius:10px;padding:0 7px;
font-variant-numeric:tabular-nums}
.more{color:var(--muted)}
.why{margin:6px 0 0;padding:0 0 0 16px;color:var(--bad)}
details{margin-top:6px}summary{cursor:pointer;color:var(--accent)}
.card details img{margin-top:6px;border-radius:4px;aspect-ratio:4/3;object-fit:contain;
background:#111}
footer{color:var(--muted);font-size:12px;text-align:center;padding:24px}
"""


def _stats_html(images: list[ImageSummary], all_scores: np.ndarray, num_flagged: int) -> str:
    """The header's counts: images, instances, per image, median score, flagged."""
    e = html.escape
    n_inst = int(all_scores.size)
    stats = [(len(images), "images"), (n_inst, "instances"),
             (f"{n_inst / len(images):.1f}" if images else "–", "per image"),
             (f"{np.median(all_scores):.3g}" if n_inst else "–", "median score")]
    stat_html = "".join(f"<li><b>{e(str(v))}</b><span>{e(k)}</span></li>" for v, k in stats)
    return stat_html + (f'<li class="{"bad" if num_flagged else ""}"><b>{num_flagged}</b>'
                        '<span>flagged</span></li>')


def _run_table(manifest: Manifest) -> str:
    """The "Run" panel's rows: the settings and provenance that explain the results."""
    cfg, env, train = manifest.config, manifest.environment, manifest.train
    prior_kind = "trained on saliency labels" if manifest.prior_trained else "unsupervised"
    # environment: runtime.environment_record's facts; cuda_device is set on CUDA only
    cfg_rows = [("preset", cfg.preset),
                ("prior", f"{cfg.prior} ({prior_kind})"),
                ("epochs", f"{cfg.epochs} (model from cache)" if train is not None and train.cached
                 else cfg.epochs),
                ("image size", cfg.image_size),
                ("frozen layers", "none" if cfg.freeze_until == "none"
                 else f"conv1_1 … {cfg.freeze_until}"),
                ("feature layer", cfg.feature_layer),
                ("training loss", _loss_trend(train)),
                ("proposals", f"{cfg.proposal_method} ≤ {cfg.max_proposals}"),
                ("device", env.get("cuda_device") or env.get("device")),
                ("VGG-16 weights", None if manifest.weights is None else manifest.weights.source),
                ("coseg", env.get("coseg")), ("seed", cfg.seed),
                ("started", manifest.started_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC"))]
    return "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in cfg_rows if v is not None)


def _timings_table(manifest: Manifest) -> str:
    """The "Timings" rows: the stages in pipeline order, any others, then the total."""
    timings = manifest.timings_s
    order = ["prior", "train", "proposals", "instances", "select", "write_files", "write_json"]
    t_rows = [(k, timings[k]) for k in order if k in timings]
    t_rows += [(k, v) for k, v in timings.items() if k not in order and k != "total"]
    t_html = "".join(f"<tr><td>{html.escape(k.replace('_', ' '))}</td>"
                     f"<td>{_fmt_seconds(v)}</td></tr>" for k, v in t_rows)
    return t_html + (f"<tr><td><b>total</b></td><td><b>{_fmt_seconds(manifest.seconds)}</b></td>"
                     "</tr>")


def _outliers_html(flagged: list[ImageSummary], th: Thresholds) -> tuple[str, str, str]:
    """(the histogram's legend for the confidence level, the flagging rule, the flagged list)."""
    e = html.escape
    legend = ""
    if th.score is not None:
        legend = (f'<p class="legend"><i></i>confidence level {th.score:.3g} '
                  f"(P{th.score_percentile:g} of all instance scores: an image whose best "
                  "instance is below it has no confident instance)</p>")
    if flagged:
        items = "".join(f'<li><a href="#img-{im.index + 1}">{e(im.name)}</a> — '
                        f'{e("; ".join(im.reasons))}</li>' for im in flagged)
        outliers = f'<ul class="outliers">{items}</ul>'
    else:
        outliers = '<p class="ok">No image flagged: every image has a confident instance and ' \
            "co-saliency in line with the folder.</p>"
    rule = ("Flagged: no instance, best score below the confidence level, or mean co-saliency "
            f"below {e(f'{th.cosaliency:.3f}')} (folder median minus 3 robust σ, at least "
            f"{COSAL_MIN_GAP:g}, or {COSAL_RATIO:g}× the median)." if th.cosaliency is not None else
            "Flagged: no instance, or best score below the confidence level.")
    return legend, rule, outliers


def render_report(out_dir: Path) -> str:
    """The report page of one output folder as an HTML string (reads, never writes).

    Raises:
        InputError: the folder has no (readable) instances.json or manifest.json.
    """
    e = html.escape
    out_dir = Path(out_dir)
    manifest, images, th = summarize(out_dir)
    env = manifest.environment
    all_scores = np.array([s for im in images for s in im.scores], np.float64)
    flagged = [im for im in images if im.reasons]
    category, folder = manifest.category, manifest.input_folder
    stat_html = _stats_html(images, all_scores, len(flagged))
    kv = _run_table(manifest)
    t_html = _timings_table(manifest)
    skipped_html = "" if not manifest.skipped_files else (
        '<div class="panel" style="margin-top:16px"><h3>Skipped input files</h3><ul>'
        + "".join(f"<li>{e(s)}</li>" for s in manifest.skipped_files) + "</ul></div>")
    legend, rule, outliers = _outliers_html(flagged, th)
    gallery = "".join(_card(im, out_dir) for im in images) or \
        '<p class="legend">No images in this run.</p>'
    title = f"coseg · {category} · {Path(folder).name or folder}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{e(title)}</title><style>{_CSS}</style></head>
<body><header>
<h1>coseg report · <span class="cat">{e(category)}</span></h1>
<p class="sub">{e(folder)} → {e(str(out_dir))}</p>
<ul class="stats">{stat_html}</ul>
</header><main>
<div class="panels">
<section class="panel"><h3>Score histogram</h3>{score_histogram_svg(all_scores, marker=th.score)}
{legend}<h3 style="margin-top:14px">Timings</h3><table class="kv">{t_html}</table></section>
<section class="panel"><h3>Run</h3><table class="kv">{kv}</table></section>
</div>{skipped_html}
<h2>Likely outliers ({len(flagged)})</h2>
<p class="legend">{rule}</p>
{outliers}
<h2>Gallery</h2>
<div class="gallery">{gallery}</div>
</main><footer>Generated by coseg {e(str(env.get("coseg", "")))} from instances.json and
manifest.json · regenerate with <code>coseg report {e(str(out_dir))}</code></footer>
</body></html>
"""


def write_report(out_dir: Path) -> Path:
    """Write OUT/report.html atomically and return its path.

    Raises:
        InputError: the folder has no (readable) instances.json or manifest.json, or report.html
            cannot be written there.
    """
    out_dir = Path(out_dir)
    page = render_report(out_dir)
    path = out_dir / REPORT_NAME
    try:
        atomic_write_bytes(path, page.encode("utf-8"))
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path

"""One frozen config per run. Field defaults are the paper's (DeepCO3, CVPR 2019) or the authors'
released code's; each comment names its source. Presets are named variants built with `replace`."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import ConfigError

FREEZE_CHOICES = ("none", "conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")
FEATURE_LAYERS = ("pool5", "fc6_new")
RANKINGS = ("peaks", "common")
COMMON_AGGREGATES = ("mean", "median")
NET_STRIDE = 32  # VGG-16 to pool5: five 2×2 max-pools, 448 → 14
COSAL_STRIDES = (NET_STRIDE, NET_STRIDE // 2)  # pool5, conv5_3
# Fields that change how a run executes, never what it computes (no stage cache key holds them).
RUNTIME_FIELDS = ("device", "num_threads", "preset")


@dataclass(frozen=True)
class CosegConfig:
    """Every knob of one run; written verbatim to manifest.json."""

    # --- stage 1: co-peak search (fine-tuning) ---
    image_size: int = 448  # paper §3.4: every image resized to 448×448 (aspect ignored)
    epochs: int = 40  # paper §3.4
    batch_images: int = 6  # paper §3.4: piecewise training, 6 images → 3 pairs per batch
    lr: float = 1e-6  # paper §3.4, Adam, constant
    # Adam lr of the zero-initialised 1×1 saliency head; 0 = same as `lr` (paper). Raw pool5
    # features have per-location norms of ~30–90, so a head step moves logits ~100× more than
    # the same lr moves the backbone: with few steps the head needs its own rate.
    head_lr: float = 0.0
    weight_decay: float = 5e-4  # paper §3.4
    lambda_copeak: float = 0.5  # λ_t, paper eq. 1
    lambda_affinity: float = 0.1  # λ_a, paper eq. 1
    affinity_alpha: float = 4.0  # α, paper eq. 4
    # The paper's head is fc6 as a 7×7 conv (4096 ch); no fc6 weights exist offline, so the
    # default is VGG-16 pool5 (512 ch, 14×14 at 448). "fc6_new" is a freshly initialised 7×7 head.
    feature_layer: str = "pool5"
    freeze_until: str = "none"  # paper: all layers updated; "conv3_3" freezes conv1_1…conv3_3
    # --- priors and proposals (SVFSal and MCG are unavailable; see saliency.py, proposals.py) ---
    # saliency.METHODS name. "fusion" (spectral residual + MB+) is the best UNSUPERVISED prior
    # measured by benchmarks/priors.py on coco-dev (294 images, 36 categories ≤ 40 images,
    # work_max_side 640), max F-β / AUC: fusion 0.185 / 0.695, mbplus 0.183 / 0.673,
    # spectral_residual 0.149 / 0.688; trained on saliency labels: fusion_u2netp 0.203 / 0.680
    # (the `fast` preset's), u2netp 0.185 / 0.621. fusion takes 0.38 s/img on the 2-core CPU.
    prior: str = "fusion"
    proposal_method: str = "hierarchical"  # proposal source (proposals.METHODS)
    # Cap per image, highest proposal scores kept. benchmarks/proposals.py, 37 coco-dev images
    # (1 per category): recall@0.5 0.09 / 0.20 / 0.39 at 100 / 300 / 1000, still rising at
    # 1000; 1000 masks at 640×480 are ~0.3 GB, within the 2 GB budget.
    max_proposals: int = 1000
    min_area_frac: float = 2e-5  # authors' code: proposals kept at 2e-5 ≤ area/image ≤ 0.85
    max_area_frac: float = 0.85
    work_max_side: int = 640  # priors/proposals run with the longer side capped here, mapped back
    # --- stage 2: instance masks ---
    # "peaks": the paper's — co-saliency peaks, peak back-propagation, eq. 7 per peak, NMS.
    # "common": every proposal scored by co-saliency contrast × cross-image commonness, then NMS
    # (instances.py; not in DeepCO3, measured in BENCHMARKS.md).
    ranking: str = "peaks"
    # Stride of the co-saliency map in stage 2: 32 = the head on pool5 (paper); 16 = the same
    # 1×1 head on conv5_3, before the last pooling (twice as fine, no extra weights).
    cosal_stride: int = 32
    # Input size of the stage-2 forward pass and peak back-propagation; 0 = image_size (paper).
    # The net is fully convolutional, so a larger size gives a finer logit map (stride 32).
    infer_size: int = 0
    max_peaks: int = 0  # peaks back-propagated per image, strongest first; 0 = all (paper)
    rank_beta: float = 0.8  # β, paper eq. 7
    rank_gamma: float = 1e-5  # γ, paper eq. 7
    # Exponent on the co-saliency S wherever it enters eq. 7: 1 = the paper; 0 makes S ≡ 1, the
    # paper's Table 3 ablation "without co-saliency in ranking" (BENCHMARKS.md: 14.6 → 5.4).
    rank_cosal_power: float = 1.0
    contour_px: int = 5  # paper eq. 7: contour = dilate(P,5×5) XOR erode(P,5×5)
    nms_iou_thresh: float = 0.4  # authors' code (RunDeepInstCoseg.m)
    # "common" only: ring around a mask whose co-saliency it is contrasted with (working px),
    # instances kept per image, seeds per image that the other images are matched against, and
    # the exponent of commonness in the final score (BENCHMARKS.md, issue 11)
    ring_px: int = 8
    max_instances: int = 20
    common_seeds: int = 5
    common_power: float = 1.0
    # "common": contrast = (S inside − S around)₊ · (S inside)^p. p = 1 (session 2) rewarded a
    # weakly co-salient mask less than a strongly co-salient one with the same margin; p = 0,
    # with the two fields below, measured 9.2 / 4.3 against 8.0 / 3.4 mAP^r@.25 / @.5 on all 36
    # coco-dev categories (BENCHMARKS.md, issue 11 session 4). A ring weight below 1 favoured
    # masks that spill over the blob (0.5: 4.3 / 1.7).
    contrast_inside_power: float = 0.0
    # "common": candidates per image, best contrast first, that the folder step re-ranks with
    # commonness *before* NMS (instead of NMS on contrast alone, then commonness on the
    # survivors); 100 scores as the whole pool does (9.2 / 4.3 both; 50: 8.1 / 3.8)
    common_pool: int = 100
    # "common": how a candidate's best matches in the other images are pooled: "median" (a
    # typical other image) or "mean". Median 9.2 / 4.3, mean 8.5 / 3.6 with the two above:
    # clutter that recurs in some photos (people, tables) lifts a mean more than a median.
    common_aggregate: str = "median"
    # Final score = R × consensus^p, consensus = an instance's mean best feature similarity to the
    # other images' instances (ranking.consensus_scores), applied after the noise filter;
    # 0 = off (paper). Not in DeepCO3: see the `fast` preset for the measurement.
    consensus_power: float = 0.0
    noise_percentile: float = 20.0  # authors' code: drop instances below this folder percentile
    # "common": multiplier of the final score of a candidate on the background side of the
    # folder's DDT direction (Wei et al., IJCAI 2017: the first principal component of every
    # pool5 descriptor of the folder, its sign set by the commonness seeds;
    # ranking.ddt_direction); 1 = off (paper). Not in DeepCO3: see the `fast` preset.
    ddt_negative_weight: float = 1.0
    # Self-training rounds (selftrain.py; not in DeepCO3): after stage 2 and the folder step, the
    # network is fine-tuned anew on the ranked instances painted with their folder-normalised
    # scores instead of the prior, then stage 2 runs again; 0 = off (paper). No cache key holds
    # it: a round's targets enter its weights' key (train.priors_digest) and the weights the
    # next stage 2's.
    self_train_rounds: int = 0
    # --- runtime ---
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:i"
    num_threads: int = 0  # torch CPU threads; 0 = all physical cores
    preset: str = "paper"  # name of the preset these values started from (informational)

    def __post_init__(self) -> None:
        _check_types(self)
        if not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        _positive_int(self, "image_size", "epochs", "batch_images", "max_proposals",
                      "work_max_side", "contour_px", "ring_px", "max_instances", "common_seeds",
                      "common_pool")
        if self.ranking not in RANKINGS:
            raise ConfigError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.cosal_stride not in COSAL_STRIDES:
            raise ConfigError(f"cosal_stride must be one of {COSAL_STRIDES}, "
                              f"got {self.cosal_stride!r}")
        if self.cosal_stride == 16 and self.feature_layer != "pool5":
            raise ConfigError("cosal_stride 16 needs feature_layer pool5 (the saliency head then "
                              f"reads conv5_3's 512 channels), got {self.feature_layer!r}")
        if self.common_aggregate not in COMMON_AGGREGATES:
            raise ConfigError(f"common_aggregate must be one of {COMMON_AGGREGATES}, "
                              f"got {self.common_aggregate!r}")
        if self.common_power < 0:
            raise ConfigError(f"common_power must be >= 0, got {self.common_power}")
        if self.infer_size < 0 or self.infer_size % NET_STRIDE != 0:
            raise ConfigError("infer_size must be 0 (= image_size) or a positive multiple of "
                              f"{NET_STRIDE}, got {self.infer_size}")
        if self.self_train_rounds < 0:
            raise ConfigError(f"self_train_rounds must be >= 0, got {self.self_train_rounds}")
        if self.max_peaks < 0:
            raise ConfigError(f"max_peaks must be >= 0 (0 = no cap), got {self.max_peaks}")
        if self.image_size % NET_STRIDE != 0:
            raise ConfigError(f"image_size must be a multiple of {NET_STRIDE} (VGG-16 stride), "
                              f"got {self.image_size}")
        if self.batch_images < 2:
            raise ConfigError("batch_images must be >= 2 (pairs are needed), got "
                              f"{self.batch_images}")
        if self.head_lr < 0:
            raise ConfigError(f"head_lr must be >= 0 (0 = same as lr), got {self.head_lr}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("lr must be > 0 and weight_decay >= 0, got "
                              f"{self.lr}, {self.weight_decay}")
        if not 0.0 < self.nms_iou_thresh <= 1.0:
            raise ConfigError(f"nms_iou_thresh must be in (0, 1], got {self.nms_iou_thresh}")
        if self.consensus_power < 0:
            raise ConfigError(f"consensus_power must be >= 0, got {self.consensus_power}")
        if self.rank_cosal_power < 0:
            raise ConfigError(f"rank_cosal_power must be >= 0, got {self.rank_cosal_power}")
        if self.ddt_negative_weight > 1.0:
            raise ConfigError("ddt_negative_weight must be in [0, 1] (1 = off), got "
                              f"{self.ddt_negative_weight}")
        if not 0.0 <= self.noise_percentile < 100.0:
            raise ConfigError(f"noise_percentile must be in [0, 100), got {self.noise_percentile}")
        if not 0.0 <= self.min_area_frac < self.max_area_frac <= 1.0:
            raise ConfigError("need 0 <= min_area_frac < max_area_frac <= 1, got "
                              f"{self.min_area_frac}, {self.max_area_frac}")
        if self.freeze_until not in FREEZE_CHOICES:
            raise ConfigError(f"freeze_until must be one of {FREEZE_CHOICES}, "
                              f"got {self.freeze_until!r}")
        if self.feature_layer not in FEATURE_LAYERS:
            raise ConfigError(f"feature_layer must be one of {FEATURE_LAYERS}, "
                              f"got {self.feature_layer!r}")
        if self.num_threads < 0:
            raise ConfigError(f"num_threads must be >= 0, got {self.num_threads}")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CosegConfig:
        """Rebuild from a manifest's `config`; unknown keys are an error, not silently dropped."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {unknown}")
        return cls(**data)


def _check_types(cfg: CosegConfig) -> None:
    """Each field has its default's type: ints are ints (not bools), floats finite and >= 0
    (every float knob is a rate, weight, fraction or exponent; an int is taken as a float),
    strings strings. Narrower ranges are checked field by field after this."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        kind = type(f.default)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{f.name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(cfg, f.name, float(value))  # 1 and 1.0: one cache key
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{f.name} must be an integer, got {value!r}")
        elif not isinstance(value, str):
            raise ConfigError(f"{f.name} must be a string, got {value!r}")


def _positive_int(cfg: CosegConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


# The paper's settings, and the default tuned for a 2-core CPU (see BENCHMARKS.md).
PRESETS: dict[str, CosegConfig] = {
    "paper": CosegConfig(preset="paper"),
    "fast": CosegConfig(
        preset="fast",
        image_size=320,  # wall time scales with pixels; 320² is 2× cheaper than 448²
        epochs=10,
        # halves the backward pass, and conv1–3's forward runs once per photo instead of once per
        # step (train.frozen_prefix); low-level filters barely move
        freeze_until="conv3_3",
        lr=1e-5,  # backbone: 1e-3 blew pool5 features up (logits ~ -2e4, an all-zero map)
        # head: 1e-4 left the map flat after 5–10 steps (logits within ±0.2); 1e-3 with 10 epochs
        # gave mAP^r@.25 14.9 on pizza/umbrella/teddy_bear vs 1.7 (BENCHMARKS.md)
        head_lr=1e-3,
        # peak back-propagation costs ~0.8 s per peak at 320 on this CPU; 6 and 8 gave identical
        # scores on four coco-dev categories (BENCHMARKS.md), 4 lost 1.1 mAP^r@.25 on seven
        max_peaks=6,
        # cross-image consensus re-scoring: 14.6 / 5.0 / 16.0 → 15.7 / 6.1 / 21.9 mAP^r@.25 / @.5 /
        # CorLoc^r on seven coco-dev categories (BENCHMARKS.md, issue 7 second pass)
        consensus_power=2.0,
        # stage 2: every proposal by co-saliency contrast on a 40×40 map (640 px input, conv5_3)
        # × commonness, instead of eq. 7 per peak (BENCHMARKS.md, issue 11: all 36 coco-dev
        # categories)
        ranking="common",
        infer_size=640,
        cosal_stride=16,
        # best measured prior overall (benchmarks/priors.py, coco-dev 294 images): max F-β 0.203
        # vs 0.185 fusion / 0.185 u2netp alone; uses U²-Net-p, TRAINED on saliency labels
        prior="fusion_u2netp",
        # DDT gate: all 36 coco-dev categories, trained prior, 9.12 / 4.33 → 9.45 / 4.40
        # mAP^r@.25 / @.5 (26 categories better, 8 worse @.25); weights 0–0.5 gave the same
        # within 0.04 (BENCHMARKS.md, issue 11 session 7)
        ddt_negative_weight=0.1,
    ),
}
DEFAULT_PRESET = "fast"


def preset_config(name: str = DEFAULT_PRESET, **overrides: Any) -> CosegConfig:
    """The named preset with `overrides` applied (None values are ignored)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
    changes = {k: v for k, v in overrides.items() if v is not None}
    try:
        return replace(base, **changes)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None

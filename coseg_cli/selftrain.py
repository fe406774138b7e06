"""Self-training: one round's ranked instances become the next round's saliency targets.

The prior lights up whatever is salient in each photo on its own; the folder step's scores
(co-saliency contrast × commonness across the folder) say which candidates recur. Painting each
image's selected candidates with their folder-normalised scores gives a target in which salient
clutter that the other photos do not share is dimmed, and fine-tuning anew on it lets the network
carry that to every pixel — candidates ranked low, or outside each image's kept pool, included.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import coco

# Config fields this stage reads. No cache key holds them: each round's fine-tuned weights are
# keyed by their targets (train.priors_digest), and the next stage 2 by those weights.
CONFIG_FIELDS = ("self_train_rounds",)


def pseudo_labels(masks_rle: Sequence[Sequence[coco.Rle]],
                  selected: Sequence[tuple[np.ndarray, np.ndarray]],
                  shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Per image, float32[h,w] in [0,1]: at each pixel the highest score / the folder's best
    score among the selected candidates that cover it (0 where none does).

    Scores are normalised by the folder's best, not each image's, so an image whose best
    candidate the other photos barely share teaches the network less than one whose best is
    common.

    Args:
        masks_rle: per image, its candidates' masks (RLE at working resolution).
        selected: per image, (indices into its candidates, their final scores), as
            `instances.select_folder` returns them.
        shapes: per image, (h, w) of its working resolution.
    """
    best = max((float(np.max(s)) for _, s in selected if len(s)), default=0.0)
    out = []
    for rles, (order, scores), (h, w) in zip(masks_rle, selected, shapes, strict=True):
        target = np.zeros((h, w), np.float32)
        if best > 0:
            for j, s in zip(order, scores):
                np.maximum(target, np.float32(s / best) * coco.decode(rles[j]), out=target)
        out.append(target)
    return out

"""Instance correspondences across a folder: which instance of image A is the same kind of
object/part as which instance of image B. Each instance is described by the mean of the
fine-tuned, normalised VGG features inside its mask (the features the co-peak loss trained to
agree across images); pairs are mutual best matches by cosine similarity, and groups are the
connected components of confident matches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .records import EncodedInstance, Instance, RunResult

# Mutual best matches at or above this cosine similarity link instances into one group.
# Unit-norm VGG pool5 averages of unrelated regions typically score 0.2–0.5; the same kind of
# object across photos scores higher. Pairs below it are still listed, just not grouped.
GROUP_SIMILARITY_THRESH = 0.6


def mutual_best_matches(emb_a: np.ndarray, emb_b: np.ndarray) -> list[tuple[int, int, float]]:
    """Mutual nearest neighbours by cosine similarity.

    Args:
        emb_a: float32[Na,C], emb_b: float32[Nb,C], rows unit-norm.

    Returns:
        (index in a, index in b, similarity) for each pair that is each other's best match,
        sorted by similarity descending.
    """
    if len(emb_a) == 0 or len(emb_b) == 0:
        return []
    sim = emb_a @ emb_b.T
    best_b = sim.argmax(axis=1)
    best_a = sim.argmax(axis=0)
    pairs = [(i, int(j), float(sim[i, j])) for i, j in enumerate(best_b) if best_a[j] == i]
    return sorted(pairs, key=lambda p: -p[2])


def _groups(num: int, edges: list[tuple[int, int]]) -> np.ndarray:
    """Connected components (union-find) numbered 1.. in order of first member."""
    parent = list(range(num))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    ids: dict[int, int] = {}
    return np.array([ids.setdefault(root(i), len(ids) + 1) for i in range(num)], np.int64)


def instance_matches(result: RunResult,
                     group_thresh: float = GROUP_SIMILARITY_THRESH) -> dict[str, Any]:
    """The matches.json document for a run (annotation ids as in instances.json)."""
    return matches_document([r.name for r in result.images], result.instances, group_thresh)


def matches_document(names: Sequence[str], instances: Sequence[Instance | EncodedInstance],
                     group_thresh: float = GROUP_SIMILARITY_THRESH) -> dict[str, Any]:
    """The matches.json document from each image's name and the instances' image index, rank
    and embedding (full or encoded instances alike; annotation ids as in instances.json)."""
    ordered = sorted(instances, key=lambda t: (t.image_index, t.rank))
    per_image: list[list[int]] = [[] for _ in names]
    for k, inst in enumerate(ordered):
        per_image[inst.image_index].append(k)
    dim = next((len(t.embedding) for t in ordered if t.embedding is not None), 0)
    emb = np.stack([t.embedding if t.embedding is not None else np.zeros(dim, np.float32)
                    for t in ordered]) if ordered else np.zeros((0, dim), np.float32)
    pairs, edges = [], []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            ia, ib = per_image[a], per_image[b]
            found = mutual_best_matches(emb[ia], emb[ib])
            if not found:
                continue
            pairs.append({
                "image_a": names[a], "image_b": names[b],
                "matches": [{"a": ia[i] + 1, "b": ib[j] + 1, "similarity": round(s, 4)}
                            for i, j, s in found],
            })
            edges += [(ia[i], ib[j]) for i, j, s in found if s >= group_thresh]
    group = _groups(len(ordered), edges)
    members: dict[int, list[int]] = {}
    for k, g in enumerate(group):
        members.setdefault(int(g), []).append(k + 1)
    return {
        "similarity": "cosine of mean fine-tuned features inside each mask",
        "group_similarity_thresh": group_thresh,
        "instances": [{"id": k + 1, "image": names[t.image_index], "rank": t.rank,
                       "group": int(group[k])} for k, t in enumerate(ordered)],
        "pairs": pairs,
        "groups": [{"id": g, "size": len(m), "members": m}
                   for g, m in sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0]))],
    }

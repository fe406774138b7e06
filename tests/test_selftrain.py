"""Self-training: the targets one round hands the next, and how the pipeline runs the rounds."""

from __future__ import annotations

import dataclasses

import numpy as np
from conftest import blob_image

from coseg_cli import coco, pipeline, selftrain
from coseg_cli.config import preset_config


def _rect(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_pseudo_labels_paint_selected_candidates_with_folder_normalised_scores() -> None:
    """Each pixel takes the best score among the selected candidates covering it, divided by
    the folder's best; candidates not selected and pixels no candidate covers stay 0."""
    a = [_rect(6, 8, 0, 0, 4, 4), _rect(6, 8, 2, 2, 6, 6), _rect(6, 8, 0, 6, 2, 8)]
    b = [_rect(5, 5, 1, 1, 3, 3)]
    rles = [coco.encode_masks(np.stack(a)), coco.encode_masks(np.stack(b))]
    selected = [(np.array([1, 0]), np.array([0.8, 0.4])),  # candidate 2 not selected
                (np.array([0]), np.array([0.2]))]
    ta, tb = selftrain.pseudo_labels(rles, selected, [(6, 8), (5, 5)])
    assert ta.dtype == np.float32 and ta.shape == (6, 8) and tb.shape == (5, 5)
    assert ta[3, 3] == 1.0  # inside both: the better one (0.8 / 0.8)
    assert ta[0, 0] == 0.5  # only in candidate 0: 0.4 / 0.8
    assert ta[0, 7] == 0.0  # candidate 2 was not selected
    assert ta[5, 0] == 0.0  # no candidate
    # image b's best is 0.2 of the folder's 0.8: it teaches a quarter as much
    np.testing.assert_allclose(tb, np.where(b[0], 0.25, 0.0).astype(np.float32))


def test_pseudo_labels_of_an_empty_selection_are_zero() -> None:
    rles = [coco.encode_masks(np.stack([_rect(4, 4, 0, 0, 2, 2)]))]
    (t,) = selftrain.pseudo_labels(rles, [(np.zeros(0, np.int64), np.zeros(0))], [(4, 4)])
    assert t.shape == (4, 4) and not t.any()


def test_a_self_training_round_fine_tunes_on_the_first_rounds_instances(monkeypatch) -> None:
    """Round 2 trains on `pseudo_labels` of round 1's selection (not on the priors); proposals
    still come from the priors; the sink gets each image's map once, from the last round."""
    cfg = preset_config(image_size=64, epochs=1, max_proposals=40, work_max_side=96,
                        device="cpu", seed=0, prior="spectral_residual", infer_size=64,
                        num_threads=1)
    trained_on, made, proposed_from = [], [], []
    finetune, labels = pipeline.finetuned_model, selftrain.pseudo_labels
    proposals = pipeline.compute_proposals

    def recording_proposals(img, prior, *args, **kwargs):
        proposed_from.append(prior.copy())
        return proposals(img, prior, *args, **kwargs)

    def recording_finetune(works, targets, *args, **kwargs):
        trained_on.append([t.copy() for t in targets])
        return finetune(works, targets, *args, **kwargs)

    def recording_labels(*args, **kwargs):
        made.append(labels(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(pipeline, "finetuned_model", recording_finetune)
    monkeypatch.setattr(selftrain, "pseudo_labels", recording_labels)
    monkeypatch.setattr(pipeline, "compute_proposals", recording_proposals)
    imgs = [blob_image(64, seed=i) for i in range(3)]
    once = pipeline.cosegment(imgs, cfg)
    assert len(trained_on) == 1 and not made
    twice = pipeline.cosegment(imgs, dataclasses.replace(cfg, self_train_rounds=1))
    assert len(trained_on) == 3 and len(made) == 1
    for prior, first, target in zip(trained_on[0], trained_on[1], trained_on[2]):
        np.testing.assert_array_equal(prior, first)  # round 1 of both runs: the priors
        assert target.max() <= 1.0 and not np.array_equal(target, prior)
    for got, want in zip(trained_on[2], made[0]):
        np.testing.assert_array_equal(got, want)
    assert len(proposed_from) == 3 + 2 * 3  # each round of each run asks for every image's
    for n, prior in enumerate(proposed_from):
        np.testing.assert_array_equal(prior, trained_on[0][n % 3])  # always from the prior
    assert any(t.max() == 1.0 for t in made[0])  # the folder's best instance
    assert len(twice.cosaliency) == len(once.cosaliency) == 3
    assert {i.image_index for i in twice.instances} == {0, 1, 2}

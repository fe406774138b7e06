"""Piecewise fine-tuning: batches, bit-identical seeded CPU runs, NaN guard, cache, real folder."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from conftest import blob_image

from coseg_cli import model as M
from coseg_cli import train as T
from coseg_cli.config import CosegConfig
from coseg_cli.errors import TrainingError

TINY = CosegConfig(image_size=64, epochs=1, batch_images=4, lr=1e-4, device="cpu")


def _random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {f"features.{k}": v for k, v in M.vgg16_features().state_dict().items()}


def _tiny_folder(n: int = 4) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images = [blob_image(48 + 4 * i, seed=i) for i in range(n)]
    priors = [(img.astype(np.float32).std(axis=2) / 128.0).clip(0, 1) for img in images]
    return images, priors


def test_make_batches_cover_every_image_with_even_sizes():
    gen = torch.Generator().manual_seed(0)
    batches = T.make_batches(7, 6, gen)
    assert [len(b) for b in batches] == [6, 2]
    assert sorted({i for b in batches for i in b}) == list(range(7))
    assert batches[1][0] != batches[1][1]  # borrowed image differs from the lone one
    b3 = T.make_batches(3, 6, gen)[0]  # no outside image: duplicate, never paired with itself
    assert len(b3) == 4 and all(b3[i] != b3[i + 2] for i in range(2))
    with pytest.raises(TrainingError):
        T.make_batches(1, 6, gen)


def test_seeded_cpu_runs_are_bit_identical():
    images, priors = _tiny_folder()
    results = []
    for _ in range(2):
        net = M.build_model(TINY, _random_state())
        report = T.finetune(net, images, priors, TINY, device="cpu")
        results.append((net.state_dict(), report.history))
    (a, ha), (b, hb) = results
    assert ha == hb
    assert all(torch.equal(a[k], b[k]) for k in a)
    # training runs channels-last; the weights leave it in the standard layout
    assert all(t.is_contiguous() for t in a.values())
    assert not torch.equal(a["saliency.weight"], torch.zeros_like(a["saliency.weight"]))


@pytest.mark.parametrize("until, first_trained", [("conv3_3", 17), ("conv5_3", 31)])
def test_frozen_prefix_is_computed_once_and_trains_the_same_weights(monkeypatch, until,
                                                                      first_trained):
    """The frozen prefix of the trunk runs once per image instead of once per step, and the
    fine-tuning ends on the weights that recomputing it every step gives."""
    images, priors = _tiny_folder(6)
    cfg = dataclasses.replace(TINY, freeze_until=until, epochs=3, head_lr=1e-2, lr=1e-3)
    calls = []

    def run(cached: bool) -> tuple[dict[str, torch.Tensor], list]:
        net = M.build_model(cfg, _random_state())
        net.features[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        if not cached:
            monkeypatch.setattr(T, "frozen_prefix", lambda *a: None)
        calls.clear()
        report = T.finetune(net, images, priors, cfg, device="cpu")
        monkeypatch.undo()
        return net.state_dict(), report.history

    cached, h_cached = run(True)
    assert calls == [4, 2]  # 6 images in chunks of batch_images, once
    fresh, h_fresh = run(False)
    assert len(calls) == 6  # 2 batches a epoch × 3 epochs, each through conv1_1
    start = M.build_model(cfg, _random_state())
    for key in cached:
        torch.testing.assert_close(cached[key], fresh[key], rtol=1e-4, atol=1e-6)
    trained = [k for k in cached if not torch.equal(cached[k], start.state_dict()[k])]
    assert "saliency.weight" in trained
    trained_convs = [k for k in trained if k.startswith("features")]
    assert all(int(k.split(".")[1]) >= first_trained for k in trained_convs)
    assert bool(trained_convs) == (until == "conv3_3")  # conv4_1 … conv5_3 train there only
    np.testing.assert_allclose([h["total"] for h in h_cached], [h["total"] for h in h_fresh],
                               rtol=1e-4)


def test_frozen_prefix_is_skipped_when_nothing_is_frozen_or_it_would_not_fit():
    x = torch.zeros(3, 3, 64, 64)
    net = M.build_model(dataclasses.replace(TINY, freeze_until="none"), _random_state())
    assert T.frozen_prefix(net, x, 2, torch.device("cpu")) is None
    net = M.build_model(dataclasses.replace(TINY, freeze_until="conv3_3"), _random_state())
    start, acts = T.frozen_prefix(net, x, 2, torch.device("cpu"))
    assert start == 17 and acts.shape == (3, 256, 8, 8)  # pool3's output, stride 8
    torch.testing.assert_close(acts, net.features[:17](x))
    assert T.frozen_prefix(net, x, 2, torch.device("cpu"), max_bytes=acts.nbytes - 1) is None


def test_nan_loss_names_the_epoch():
    images, priors = _tiny_folder()
    priors[0] = np.full_like(priors[0], np.nan)
    net = M.build_model(TINY, _random_state())
    with pytest.raises(TrainingError, match="epoch 1"):
        T.finetune(net, images, priors, TINY, device="cpu")
    assert all(p.is_contiguous() for p in net.parameters())  # the layout is restored on failure


def test_progress_and_cache_round_trip(tmp_path):
    images, priors = _tiny_folder()
    shas = [f"{i:040x}" for i in range(4)]
    calls = []
    net = M.build_model(TINY, _random_state())
    first = T.load_or_finetune(net, images, priors, shas, TINY, device="cpu", cache_dir=tmp_path,
                               progress=lambda *a: calls.append(a))
    assert not first.cached and first.steps == 1 and len(list(tmp_path.glob("*.pt"))) == 1
    assert calls == [("finetune", 1, 1)]  # records.Progress: (stage, done, total)
    again = M.build_model(TINY, _random_state())
    second = T.load_or_finetune(again, images, priors, list(reversed(shas)), TINY, device="cpu",
                                cache_dir=tmp_path)
    assert second.cached and second.steps == 0 and second.history == first.history
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())
    # Any training field, or different start weights, is a different key.
    key = T.train_cache_key(shas, TINY, "w")
    assert key != T.train_cache_key(shas, dataclasses.replace(TINY, lr=2e-4), "w")
    assert key != T.train_cache_key(shas, TINY, "other")
    assert key == T.train_cache_key(shas, dataclasses.replace(TINY, device="cuda"), "w")


def test_progress_counts_every_step_and_epoch_losses_are_logged(caplog):
    """records.Progress: one ("finetune", done, total) call per optimiser step; each epoch's mean
    losses are the report's history and one DEBUG log line."""
    images, priors = _tiny_folder()
    cfg = dataclasses.replace(TINY, epochs=2, batch_images=2)
    calls = []
    net = M.build_model(cfg, _random_state())
    with caplog.at_level(logging.DEBUG, logger="coseg_cli.train"):
        report = T.finetune(net, images, priors, cfg, device="cpu",
                            progress=lambda *a: calls.append(a))
    assert calls == [("finetune", step, 4) for step in range(1, 5)]
    assert report.steps == 4 and len(report.history) == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "coseg_cli.train"]
    assert len(lines) == 2
    for epoch, (line, means) in enumerate(zip(lines, report.history), start=1):
        assert line.startswith(f"epoch {epoch}/2: total={means['total']:.4g} ")
        assert all(f"{k}=" in line for k in T.LOSS_TERMS)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else 0.0


def test_real_folder_loss_decreases_and_saliency_follows_prior(coco_dev):
    """4 apple photos at 128 px, 6 epochs, lr 1e-3, conv1–conv4 frozen (to stay fast)."""
    from coseg_cli import saliency
    from coseg_cli import weights as W
    from coseg_cli.errors import WeightsError
    from coseg_cli.images import load_folder

    try:
        state, _ = W.load_vgg16_features(allow_download=False, prepare=False)
    except WeightsError as exc:
        pytest.skip(str(exc))
    records = load_folder(coco_dev / "apple" / "images")[0][:4]
    images = [r.image for r in records]
    cfg = CosegConfig(image_size=128, epochs=6, batch_images=4, lr=1e-3, freeze_until="conv4_3",
                      prior="fusion", work_max_side=160)
    priors = [saliency.compute_saliency(im, cfg) for im in images]
    net = M.build_model(cfg, state)
    x = M.preprocess(images, 128)
    prior = torch.stack([M.resize_prior(p, 128) for p in priors])

    def corr() -> float:
        with torch.no_grad():
            _, logits = net(x)
        return _corr(torch.sigmoid(M.upsample_logits(logits, 128)), prior)

    before = corr()
    report = T.finetune(net, images, priors, cfg, device="cpu")
    after = corr()
    assert report.history[-1]["total"] < report.history[0]["total"], report.history
    assert after > before + 0.3, (before, after)


def test_signal_points_leave_gradients_and_stop_backward_midway(monkeypatch) -> None:
    """The no-op pooling hooks change no gradient, and Python code (where a pending signal's
    KeyboardInterrupt is raised) runs *inside* the backward pass, before the early layers."""
    import torch

    from coseg_cli import train
    from coseg_cli.model import CoSegNet

    torch.manual_seed(0)
    a, b = CoSegNet(), CoSegNet()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with train._signal_points(a):
        f, lg = a(x)
        (f.mean() + lg.mean()).backward()
    f, lg = b(x)
    (f.mean() + lg.mean()).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))

    def interrupt(grad):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_keep", interrupt)
    c = CoSegNet()
    with train._signal_points(c), pytest.raises(KeyboardInterrupt):
        f, lg = c(x)
        (f.mean() + lg.mean()).backward()
    assert c.features[0].weight.grad is None  # conv1_1 never reached
    with train._signal_points(c):
        pass
    assert not c.features[4]._forward_hooks  # hooks removed on exit

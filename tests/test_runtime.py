"""runtime.run_settings: a run's threads, seeds and determinism inside the block, the caller's
settings back after it, however the block ends."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from conftest import global_state

from coseg_cli.runtime import run_settings


def test_applies_the_settings_inside_and_restores_them_after(unusual_state):
    before = global_state()
    with run_settings(2, seed=5) as threads:
        assert threads == 2 and torch.get_num_threads() == 2
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is False
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert random.random() == random.Random(5).random()
        assert np.random.random() == np.random.RandomState(5).random()
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(5)))
    assert global_state() == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_restores_the_settings_when_the_block_raises(unusual_state, exc):
    before = global_state()
    with pytest.raises(exc), run_settings(2, seed=5):
        random.random(), np.random.random(), torch.rand(1)  # advance every generator
        raise exc("stop")
    assert global_state() == before


def test_keeps_a_callers_cublas_setting(unusual_state, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with run_settings(0, seed=0):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_not_deterministic_leaves_the_flags_alone(unusual_state):
    with run_settings(1, seed=0, deterministic=False):
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is True

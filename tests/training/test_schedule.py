"""The learning-rate schedule: warm-up, cosine, onecycle, and the backbone's ramp
after it unfreezes, as the optimiser's groups get it."""

from __future__ import annotations

import math

import pytest
import torch

from mlray.config import build_config
from mlray.training.recipe import Dist, Recipe, lr_factor


def test_warmup_then_cosine_to_zero():
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup, "cosine") for s in range(total + 5)]
    assert f[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])  # linear, reaching the peak
    assert f[warmup] == 1.0 and f[55] == pytest.approx(0.5)  # half-way down the cosine
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))  # never up again
    assert f[total] == pytest.approx(0.0, abs=1e-12) and f[total + 4] == f[total]  # stays at zero past the end
    assert lr_factor(0, 100, 0, "cosine") == 1.0  # no warm-up: the peak at once
    assert lr_factor(0, 0, 0, "cosine") == 1.0  # a run of no steps does not divide by zero


def test_onecycle_rises_for_thirty_percent_then_anneals():
    total = 100
    f = [lr_factor(s, total, 999, "onecycle") for s in range(total + 1)]  # warm-up is its own rise
    assert f[0] == pytest.approx(0.04) and f[30] == 1.0
    assert all(a < b for a, b in zip(f[:30], f[1:31]))
    assert all(a >= b for a, b in zip(f[30:], f[31:]))
    assert f[total] == pytest.approx(0.0, abs=1e-12)
    assert f[65] == pytest.approx(0.5 * (1 + math.cos(math.pi * 35 / 70)))


def test_the_backbone_ramps_up_after_it_unfreezes():
    """A frozen first epoch, then the backbone's LR climbs over a warm-up's steps
    instead of jumping to the peak (the jump wrecks the pretrained features)."""
    cfg = build_config({
        "data": {"manifest": "unused", "image_size": 32, "batch_size": 4},
        "model": {"pretrained": "none", "channels_last": False},
        "optim": {"epochs": 3, "freeze_epochs": 1, "warmup_epochs": 0.5, "lr": 0.01, "backbone_lr_mult": 0.25},
        "run": {"name": "schedule"},
    })
    recipe = Recipe(cfg, ["a", "b"], [4, 4], 16, device=torch.device("cpu"), dist=Dist(1, torch.device("cpu")))
    recipe.setup()
    assert (recipe.steps_per_epoch, recipe.warmup, recipe.unfreeze_step, recipe.total_steps) == (4, 2, 4, 12)
    head = [g for g in recipe.optimizer.param_groups if g["is_head"]]
    backbone = [g for g in recipe.optimizer.param_groups if not g["is_head"]]
    assert head and backbone
    peak = [lr_factor(s, 12, 2, "cosine") * 0.01 for s in range(12)]
    ramp = [0.0] * 4 + [0.5] + [1.0] * 7  # zero while frozen, half-way up its first step, then all of it
    for step in range(12):
        recipe.state.step = step
        recipe._set_lr()
        assert [g["lr"] for g in head] == pytest.approx([peak[step]] * len(head)), step
        assert [g["lr"] for g in backbone] == pytest.approx([0.25 * ramp[step] * peak[step]] * len(backbone)), step

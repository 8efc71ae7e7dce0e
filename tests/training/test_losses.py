"""Losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mlray.config import LossConfig
from mlray.training.losses import create_loss, pos_weight_from_counts

X = torch.tensor([[2.0, -1.0]])
Y = torch.tensor([[1.0, 0.0]])


def _sig(v):
    return 1 / (1 + math.exp(-v))


def test_bce_hand_computed():
    expected = -math.log(_sig(2.0)) - math.log(1 - _sig(-1.0))
    assert create_loss(LossConfig(name="bce"))(X, Y).item() == pytest.approx(expected, rel=1e-5)


def test_bce_weighted_hand_computed():
    w = pos_weight_from_counts([10, 1], 101, max_weight=50)
    assert w.tolist() == pytest.approx([9.1, 50.0])  # 91/10; 100/1 clipped to 50
    loss = create_loss(LossConfig(name="bce_weighted", max_pos_weight=50), [10, 1], 101)
    expected = -9.1 * math.log(_sig(2.0)) - math.log(1 - _sig(-1.0))
    assert loss(X, Y).item() == pytest.approx(expected, rel=1e-5)


def test_focal_hand_computed():
    p0, p1 = _sig(2.0), _sig(-1.0)
    expected = -0.25 * (1 - p0) ** 2 * math.log(p0) - 0.75 * p1**2 * math.log(1 - p1)
    loss = create_loss(LossConfig(name="focal", focal_gamma=2, focal_alpha=0.25))
    assert loss(X, Y).item() == pytest.approx(expected, rel=1e-5)


def test_asl_hand_computed():
    p0, p1 = _sig(2.0), _sig(-1.0)
    pm = p1 - 0.05
    expected = -math.log(p0) - pm**4 * math.log(1 - pm)
    loss = create_loss(LossConfig(name="asl", gamma_neg=4, gamma_pos=0, clip=0.05))
    assert loss(X, Y).item() == pytest.approx(expected, rel=1e-5)
    # an easy negative (p below the clip) costs nothing
    assert create_loss(LossConfig(name="asl"))(torch.tensor([[-5.0]]), torch.tensor([[0.0]])).item() == 0.0


def test_losses_are_summed_over_labels_and_averaged_over_images():
    loss = create_loss(LossConfig(name="bce"))
    one = loss(X, Y).item()
    assert loss(X.repeat(4, 1), Y.repeat(4, 1)).item() == pytest.approx(one)
    assert loss(X.repeat(1, 3), Y.repeat(1, 3)).item() == pytest.approx(3 * one)

"""Metrics against scikit-learn on generated data and edge cases; collapse; thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from mlray.config import LossConfig, ThresholdConfig
from mlray.training.losses import create_loss, pos_weight_from_counts
from mlray.evaluation.metrics import format_collapse, collapse_report, multilabel_metrics
from mlray.evaluation.validation import compare_strategies
from mlray.model.thresholds import ThresholdPolicy, best_label_thresholds, tune


def _data(n=400, c=20, density=0.15, seed=0, quality=1.5):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < density).astype(int)
    scores = 1 / (1 + np.exp(-(quality * (2 * y - 1) + rng.normal(0, 1.2, (n, c)))))
    return scores, y


def _check_against_sklearn(scores, y, t=0.5):
    m = multilabel_metrics(scores, y, t)
    pred = scores >= t
    has = y.sum(axis=0) > 0
    assert m["mAP"] == pytest.approx(skm.average_precision_score(y[:, has], scores[:, has], average="macro"))
    assert m["labels_without_positives"] == int((~has).sum())
    assert m["micro_AP"] == pytest.approx(skm.average_precision_score(y.ravel(), scores.ravel()))
    assert m["lrap"] == pytest.approx(skm.label_ranking_average_precision_score(y, scores))
    assert m["ranking_loss"] == pytest.approx(skm.label_ranking_loss(y, scores))
    assert m["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["f1_samples"] == pytest.approx(skm.f1_score(y, pred, average="samples", zero_division=0))
    assert m["CP"] == pytest.approx(skm.precision_score(y, pred, average="macro", zero_division=0))
    assert m["CR"] == pytest.approx(skm.recall_score(y, pred, average="macro", zero_division=0))
    assert m["OP"] == pytest.approx(skm.precision_score(y, pred, average="micro", zero_division=0))
    assert m["OR"] == pytest.approx(skm.recall_score(y, pred, average="micro", zero_division=0))
    assert m["OF1"] == pytest.approx(m["f1_micro"])
    rows = y.sum(axis=1) > 0
    top = scores.argmax(axis=1)
    assert m["one_error"] == pytest.approx(np.mean(y[rows, top[rows]] == 0))
    return m


def test_random_data_matches_sklearn():
    scores, y = _data()
    m = _check_against_sklearn(scores, y)
    assert 0 < m["mAP"] <= 1 and m["mAP"] > m["prior.mAP"] + 0.2


def test_edge_cases_match_sklearn():
    scores, y = _data(n=60, c=8, seed=3)
    y[:, 0] = 0  # a label with no positives
    y[:, 1] = 1  # an all-positive label
    scores[:, 2] = np.round(scores[:, 2], 1)  # ties
    _check_against_sklearn(scores, y)
    one = _check_against_sklearn(scores[:1], y[:1])  # a single sample
    assert one["n_images"] == 1


def test_thousand_labels_one_percent_density():
    scores, y = _data(n=500, c=1000, density=0.01, seed=4)
    m = _check_against_sklearn(scores, y, t=0.5)
    assert m["all_negative.hamming_loss"] == pytest.approx(y.mean())
    assert m["all_negative.f1_micro"] == 0.0


def test_threshold_per_label_and_top_k():
    scores, y = _data(n=100, c=5, seed=5)
    t = np.array([0.3, 0.4, 0.5, 0.6, 0.7])
    m = multilabel_metrics(scores, y, t, top_k=2)
    assert m["f1_micro"] == pytest.approx(skm.f1_score(y, scores >= t, average="micro"))
    top2 = np.zeros_like(y, dtype=bool)
    np.put_along_axis(top2, np.argsort(-scores, axis=1)[:, :2], True, axis=1)
    assert m["OP_top2"] == pytest.approx(skm.precision_score(y, top2, average="micro"))


def test_collapse_flagged_for_all_zero_model_not_for_good_one():
    scores, y = _data(n=300, c=10, density=0.1, seed=6)
    vocab = [f"l{i}" for i in range(10)]
    prior = y.mean(axis=0)
    zero = np.full_like(scores, 0.01) + np.random.default_rng(0).normal(0, 1e-4, scores.shape)
    m0 = multilabel_metrics(zero, y, 0.5, prior=prior)
    assert m0["hamming_loss"] < 0.15  # "99% accuracy" of doing nothing
    rep = collapse_report(m0, zero, 0.5, vocab, y, settings={"loss": "bce", "threshold_strategy": "global"})
    assert rep["collapsed"] and len(rep["never_predicted"]) == 10
    advice = " ".join(rep["advice"])
    assert "loss.name=asl" in advice and "thresholds.strategy=per_label" in advice
    good = multilabel_metrics(scores, y, 0.5, prior=prior)
    assert not collapse_report(good, scores, 0.5, vocab, y)["collapsed"]


def _epochs(maps, prior=0.1, losses=None):
    losses = losses or [0.5] * len(maps)
    return [{"epoch": i + 1, "phase": "head" if i == 0 else "all", "val_mAP": m, "prior_mAP": prior,
             "train_loss": loss} for i, (m, loss) in enumerate(zip(maps, losses))]


def test_collapse_advice_names_what_the_run_shows_and_nothing_it_already_does():
    scores, y = _data(n=300, c=10, density=0.1, seed=6)
    vocab = [f"l{i}" for i in range(10)]
    zero = np.full_like(scores, 0.01) + np.random.default_rng(0).normal(0, 1e-4, scores.shape)
    m0 = multilabel_metrics(zero, y, 0.5, prior=y.mean(axis=0))
    already = {"loss": "asl", "threshold_strategy": "per_label", "at_least_one": True, "backbone_lr_mult": 0.5,
               "unfreeze_stages": 2, "lr": 2e-3, "epochs": 5, "freeze_epochs": 1}
    # a head-only epoch at 0.30, then the unfrozen backbone drags it down
    rep = collapse_report(m0, zero, 0.5, vocab, y, history=_epochs([0.30, 0.12, 0.11]), settings=already)
    advice = " ".join(rep["advice"])
    assert "fell from 0.300 (epoch 1, head only) to 0.110 after the backbone unfroze" in advice
    assert "optim.backbone_lr_mult=0.1 (now 0.5)" in advice
    for done in ("loss.name", "strategy=per_label", "at_least_one", "unfreeze_stages=2"):
        assert done not in advice, done
    # never above the prior and the loss flat: the LR, with its current value
    rep = collapse_report(m0, zero, 0.5, vocab, y, history=_epochs([0.11, 0.11, 0.11]), settings=already)
    assert any("optim.lr=0.00067 (now 0.002)" in a for a in rep["advice"])
    assert not any("fell from" in a for a in rep["advice"])
    # the loss fell but val stayed at the prior: a train/val mismatch, not the LR
    rep = collapse_report(m0, zero, 0.5, vocab, y, history=_epochs([0.11, 0.11], losses=[0.5, 0.2]), settings=already)
    assert any("learns the training rows only" in a for a in rep["advice"])
    assert "likely cause" in format_collapse(rep)


def test_tuned_thresholds_beat_half_on_a_skewed_set():
    # Skewed: rare labels and a model whose scores sit low (as after training on 99% zeros).
    rng = np.random.default_rng(7)
    n, c = 2000, 30
    y = (rng.random((n, c)) < 0.04).astype(int)
    logits = -3 + 2.5 * y + rng.normal(0, 1, (n, c))
    scores = 1 / (1 + np.exp(-logits))
    val, test = slice(0, 1000), slice(1000, None)
    cfg = ThresholdConfig(strategy="per_label", at_least_one=False)
    pol = tune(scores[val], y[val], cfg)
    f1_tuned = skm.f1_score(y[test], pol.predict(scores[test]), average="micro")
    f1_half = skm.f1_score(y[test], scores[test] >= 0.5, average="micro")
    assert f1_tuned > f1_half + 0.1
    assert len(pol.support) == c and sum(pol.support) == y[val].sum()
    back = ThresholdPolicy.from_json(pol.to_json())
    assert np.array_equal(back.predict(scores), pol.predict(scores))
    table = compare_strategies(scores[val], y[val], scores[test], y[test], cfg)
    assert {"global", "per_label", "top_k", "per_label+at_least_one"} <= set(table)


def test_per_label_thresholds_fall_back_with_little_support():
    scores, y = _data(n=200, c=4, seed=8)
    y[:, 3] = 0
    y[:3, 3] = 1  # three positives only
    pol = tune(scores, y, ThresholdConfig(strategy="per_label", min_support=5))
    assert pol.thresholds[3] == pol.global_threshold
    assert pol.thresholds[0] != pol.global_threshold


def test_best_label_threshold_is_f1_optimal():
    scores, y = _data(n=150, c=3, seed=9)
    t = best_label_thresholds(scores, y)
    for j in range(3):
        best = max(skm.f1_score(y[:, j], scores[:, j] >= s) for s in np.unique(scores[:, j]))
        assert skm.f1_score(y[:, j], scores[:, j] >= t[j]) == pytest.approx(best)


def test_at_least_one_label_per_image():
    pol = ThresholdPolicy("global", [0.9, 0.9], 0.9, at_least_one=True)
    pred = pol.predict(np.array([[0.2, 0.6], [0.95, 0.1]]))
    assert pred.tolist() == [[False, True], [True, False]]


# ---- losses against hand-computed values ----------------------------------------

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


def test_every_label_keeps_rare_labels_predicted():
    rng = np.random.default_rng(3)
    n = 400
    y = np.zeros((n, 3), dtype=np.uint8)
    y[:200, 0] = 1
    y[100:300, 1] = 1
    y[:8, 2] = 1  # rare: its scores never reach the global threshold, though they rank right
    scores = np.clip(y * 0.6 + rng.uniform(0, 0.35, y.shape), 0, 1)
    scores[:, 2] = 0.05 + 0.1 * y[:, 2] + rng.uniform(0, 0.04, n)
    prior = y.mean(axis=0)
    off = tune(scores, y, ThresholdConfig(every_label=False, at_least_one=False), prior=prior)
    on = tune(scores, y, ThresholdConfig(at_least_one=False), prior=prior)
    assert off.predict(scores)[:, 2].sum() == 0
    pred = on.predict(scores)
    assert 4 <= pred[:, 2].sum() <= 12 and pred[:8, 2].all()
    assert on.thresholds[:2] == off.thresholds[:2]  # frequent labels keep the tuned threshold

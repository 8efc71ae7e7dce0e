"""Metrics against scikit-learn on generated data and edge cases; collapse and its advice."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from mlray.evaluation.metrics import collapse_report, format_collapse, multilabel_metrics


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

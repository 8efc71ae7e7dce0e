"""One path judges every model: thresholds tuned on val, the metric set at the
policy's label sets and at 0.5, and the history record built from them."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from mlray.config import ThresholdConfig
from mlray.evaluation.validation import judge, tune_and_judge
from mlray.model.thresholds import ThresholdPolicy, tune


def _data(n=300, c=6, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.2).astype(int)
    scores = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) - 1.5 + rng.normal(0, 1.2, (n, c)))))  # low scores: 0.5 is too high
    return scores, y


def test_judge_scores_the_policys_label_sets_and_the_ranking():
    scores, y = _data()
    policy = ThresholdPolicy("global", [0.3] * 6, 0.3, at_least_one=True)
    prior = y.mean(axis=0)
    j = judge(scores, y, policy, prior)
    pred = policy.predict(scores)
    assert np.array_equal(j.predictions, pred)
    assert j.metrics["f1_micro"] == pytest.approx(skm.f1_score(y, pred, average="micro"))  # at_least_one counted
    assert j.at_half["f1_micro"] == pytest.approx(skm.f1_score(y, scores >= 0.5, average="micro"))
    assert j.metrics["mAP"] == pytest.approx(skm.average_precision_score(y, scores, average="macro"))
    record = j.record()
    assert record["val_mAP"] == j.at_half["mAP"] and record["prior_mAP"] == j.at_half["prior.mAP"]
    assert record["val_f1_micro"] == j.metrics["f1_micro"] and record["val_f1_micro@0.5"] == j.at_half["f1_micro"]
    assert record["val_pred_per_image"] == pytest.approx(pred.sum(axis=1).mean())
    assert {k for k in record if not k.startswith("val_")} == {"prior_mAP"}
    assert not j.collapse([f"l{i}" for i in range(6)])["collapsed"]


def test_tune_and_judge_tunes_the_configured_strategy_on_these_scores():
    scores, y = _data(seed=1)
    cfg = ThresholdConfig(strategy="per_label", min_support=5)
    j = tune_and_judge(scores, y, cfg, prior=y.mean(axis=0))
    want = tune(scores, y, cfg, prior=y.mean(axis=0))
    assert j.policy == want and j.policy.strategy == "per_label"
    assert j.metrics["f1_micro"] > j.at_half["f1_micro"]  # tuned beats 0.5 on scores that sit low
    dead = tune_and_judge(np.full_like(scores, 0.01), y, ThresholdConfig(), prior=y.mean(axis=0))
    assert dead.collapse([f"l{i}" for i in range(6)])["collapsed"]

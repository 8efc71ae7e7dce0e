"""Decision thresholds tuned on validation: better than 0.5 where it matters, safe where support is thin."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from mlray.config import ThresholdConfig
from mlray.evaluation.validation import compare_strategies
from mlray.model.thresholds import ThresholdPolicy, best_label_thresholds, tune


def _data(n=400, c=20, density=0.15, seed=0, quality=1.5):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < density).astype(int)
    scores = 1 / (1 + np.exp(-(quality * (2 * y - 1) + rng.normal(0, 1.2, (n, c)))))
    return scores, y


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

"""A model's scores on a labelled split, judged: thresholds, the metric set, collapse.

One path for every place that judges a model: each training epoch (tune the
thresholds on val), ``mlray head`` (the same, for a head on embeddings) and
``mlray evaluate`` (the run's own thresholds on any split). ``compare_strategies``
tunes every threshold strategy on val and scores each on held-out data, which is
how the default strategy is chosen by measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlray.config import ThresholdConfig
from mlray.evaluation.metrics import collapse_report, multilabel_metrics, threshold_metrics
from mlray.model.thresholds import ThresholdPolicy, tune


@dataclass
class Judged:
    """Scores against targets: at the policy's thresholds (``metrics``) and at 0.5."""

    policy: ThresholdPolicy
    metrics: dict  # the full metric set at the policy's thresholds (label sets as it predicts them)
    at_half: dict  # the same at one threshold of 0.5
    predictions: np.ndarray  # (N, C) bool, the policy's label sets
    scores: np.ndarray
    targets: np.ndarray

    def record(self) -> dict:
        """The ``val_*`` fields of a history record (training epochs and head passes)."""
        m, h = self.metrics, self.at_half
        return {
            "val_mAP": h["mAP"], "val_micro_AP": h["micro_AP"],
            "val_f1_micro@0.5": h["f1_micro"], "val_f1_macro@0.5": h["f1_macro"],
            "val_hamming_loss@0.5": h["hamming_loss"],
            "val_f1_micro": m["f1_micro"], "val_f1_macro": m["f1_macro"], "val_hamming_loss": m["hamming_loss"],
            "val_subset_accuracy": m["subset_accuracy"], "val_pred_per_image": m["pred_per_image"],
            "prior_mAP": h["prior.mAP"],
        }

    def collapse(self, vocab: Sequence[str], history: Sequence[dict] = (), settings: dict | None = None) -> dict:
        """``metrics.collapse_report`` of these label sets."""
        return collapse_report(self.metrics, self.scores, self.policy.thresholds, vocab, self.targets,
                               predictions=self.predictions, history=history, settings=settings)


def judge(scores: np.ndarray, targets: np.ndarray, policy: ThresholdPolicy,
          prior: Sequence[float] | None = None) -> Judged:
    """Score ``policy``'s label sets and the ranking; ``prior``: the training label frequencies."""
    pred = policy.predict(scores)
    metrics = multilabel_metrics(scores, targets, policy.thresholds, prior=prior, predictions=pred)
    at_half = multilabel_metrics(scores, targets, 0.5, prior=prior)
    return Judged(policy, metrics, at_half, pred, scores, targets)


def tune_and_judge(scores: np.ndarray, targets: np.ndarray, cfg: ThresholdConfig,
                   prior: Sequence[float] | None = None) -> Judged:
    """Tune the configured threshold strategy on these (validation) scores, then ``judge``."""
    return judge(scores, targets, tune(scores, targets, cfg, prior=prior), prior)


def compare_strategies(
    val_scores: np.ndarray, val_targets: np.ndarray, test_scores: np.ndarray, test_targets: np.ndarray,
    cfg: ThresholdConfig, strategies: Sequence[str] = ("global", "per_label", "top_k"),
    prior: Sequence[float] | None = None,
) -> dict[str, dict[str, float]]:
    """Tune each strategy on validation and score it on held-out data: how the
    default strategy is picked by measurement rather than by assumption."""
    out = {}
    variants = [(name, one, cfg.every_label) for name in strategies for one in (False, True)
                if not (name == "top_k" and one)]
    variants.append(("global", True, not cfg.every_label))
    for name, at_least_one, every in variants:
        pol = tune(val_scores, val_targets,
                   cfg.model_copy(update={"strategy": name, "at_least_one": at_least_one, "every_label": every}), prior)
        pred = pol.predict(test_scores)
        m = threshold_metrics(pred, test_targets)
        m["images_without_prediction"] = float((pred.sum(axis=1) == 0).mean())
        m["labels_never_predicted"] = int(((pred.sum(axis=0) == 0) & (np.asarray(test_targets).sum(axis=0) > 0)).sum())
        key = name + ("+at_least_one" if at_least_one else "")
        if name != "top_k" and every != cfg.every_label:
            key += "+every_label" if every else " (every_label off)"
        out[key] = m
    return out

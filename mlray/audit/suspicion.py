"""How suspicious a label is, comparable across labels: numpy only, mergeable statistics.

Each label's out-of-fold scores are summarised as two histograms on the logit
scale, one of its labelled positives and one of its labelled negatives
(``LabelStats``: built part by part, merged by addition, so no N x C matrix is
ever held in one place). From them each label gets a two-Gaussian model of its
logits (equal variance, so the log-likelihood ratio ``llr`` is linear in the
logit and monotone): positives around m1, negatives around m0. Rare labels'
gap m1 - m0 and variance are shrunk toward the pooled ones (``SHRINK`` pseudo
positives), as a handful of positives cannot pin them down. For a pair of
label j with logit z, as log-odds of being an error:

* **missing** (labelled 0): forgotten positives score like the labelled
  positives and number a share rho of them:  log rho + log(n_pos / n_neg) +
  llr(z).
* **wrong** (labelled 1): wrong tags score like the label's negatives and
  number a share phi of its positives:  log phi - llr(z).

Each is averaged (weight ``HEAD_WEIGHT``) with what the head's own score says
under the same noise (forgotten at one rate, wrong tags in proportion to the
label's use): z for missing, log(n_pos / n_neg) - z for wrong; the head is
sharp per image where the label-level model is smooth.

The suspicion is the sigmoid of that: an estimated probability that the pair is
an error, so 0.5 reads "more likely wrong than right" on every label. rho and
phi are the model's own: each is the fixed point at which the rate equals the
mean posterior it implies over the labelled negatives (positives). Counting
pairs past a confident-learning threshold (mean score of the labelled
positives) overcounts tenfold when the heads are weak, and per-label
tail-share ratios were noisy on rare labels; both lost to this when tuned
(``SHRINK``, ``HEAD_WEIGHT``) on a second noise draw's train and val rows. ``benchmarks/audit.py`` compares the ranking with
plain disagreement |y - p|, per-label confident-learning thresholds and
cleanlab's multi-label label-quality scores on the same out-of-fold scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOGIT_RANGE = 16.0  # scores are binned on logit(p) in [-16, 16]: sigmoid outputs beyond are 1e-7 from 0 or 1
BINS = 2048  # 1/64 of a logit per bin
MISSING, WRONG = "missing", "wrong"
SHRINK = 20.0  # pseudo positives pulling a label's gap and variance toward the pooled ones (tuned, see above)
RATE_FLOOR = 0.01  # lowest error rate assumed: below it the fixed point cannot tell errors from score tails
HEAD_WEIGHT = 0.5  # weight of the head's own log-odds against the label model's (tuned, see above)


def score_bins(scores: np.ndarray) -> np.ndarray:
    """The histogram bin of each score (same shape, int64)."""
    p = np.clip(np.asarray(scores, np.float64), 1e-12, 1 - 1e-12)
    logit = np.log(p) - np.log1p(-p)
    b = np.floor((logit + LOGIT_RANGE) * (BINS / (2 * LOGIT_RANGE)))
    return np.clip(b, 0, BINS - 1).astype(np.int64)


@dataclass
class LabelStats:
    """Per label, histograms of the out-of-fold scores of its labelled positives
    and negatives (``BINS`` logit bins each)."""

    pos: np.ndarray  # (C, BINS) int64
    neg: np.ndarray

    @classmethod
    def empty(cls, n_labels: int) -> "LabelStats":
        return cls(np.zeros((n_labels, BINS), np.int64), np.zeros((n_labels, BINS), np.int64))

    @classmethod
    def of(cls, scores: np.ndarray, targets: np.ndarray) -> "LabelStats":
        n, c = scores.shape
        cell = (np.arange(c)[None, :] * BINS + score_bins(scores)).reshape(-1)
        y = np.asarray(targets).astype(bool).reshape(-1)
        pos = np.bincount(cell[y], minlength=c * BINS).reshape(c, BINS)
        neg = np.bincount(cell[~y], minlength=c * BINS).reshape(c, BINS)
        return cls(pos, neg)

    def __add__(self, other: "LabelStats") -> "LabelStats":
        return LabelStats(self.pos + other.pos, self.neg + other.neg)

    @property
    def n_pos(self) -> np.ndarray:
        return self.pos.sum(axis=1)

    @property
    def n_neg(self) -> np.ndarray:
        return self.neg.sum(axis=1)


def bin_logits() -> np.ndarray:
    """The logit at the middle of each bin."""
    return (np.arange(BINS) + 0.5) * (2 * LOGIT_RANGE / BINS) - LOGIT_RANGE


@dataclass
class Calibration:
    """What the suspicion of a (label, score) pair is looked up from: one table per
    kind, indexed by label and score bin."""

    missing: np.ndarray  # (C, BINS) float32: suspicion of a labelled-0 pair in that bin
    wrong: np.ndarray  # (C, BINS) float32: suspicion of a labelled-1 pair
    audited: np.ndarray  # (C,) bool: labels with enough positives and negatives to judge
    rho: float  # forgotten positives per labelled positive, pooled
    phi: float  # wrong tags per labelled positive, pooled
    est_missing: np.ndarray  # (C,) estimated forgotten positives per label
    est_wrong: np.ndarray  # (C,) estimated wrong tags per label

    def suspicion(self, scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(N, C) suspicion of each pair's label as it stands; 0 on labels not audited."""
        b = score_bins(scores)
        y = np.asarray(targets).astype(bool)
        rows = np.broadcast_to(np.arange(scores.shape[1])[None, :], b.shape)
        out = np.where(y, self.wrong[rows, b], self.missing[rows, b])
        return np.where(self.audited[None, :], out, 0.0).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _rate(counts: np.ndarray, log_odds: np.ndarray, per: float) -> float:
    """The error rate r (errors per labelled positive, ``per`` of them) at which r
    equals the mean posterior sigmoid(log r + log_odds) over the pairs in ``counts``:
    a unique fixed point, as that mean grows slower than r. Where the scores show
    no excess of error-like pairs (weak heads, few errors) it sinks toward 0 and
    every suspicion with it, so it is held at ``RATE_FLOOR``: the ranking still
    lists the most suspicious pairs."""
    r = 0.1
    for _ in range(200):
        new = float((counts * _sigmoid(np.log(r) + log_odds)).sum() / per)
        new = min(max(new, RATE_FLOOR), 1.0)
        if abs(new - r) < 1e-7 * r:
            break
        r = new
    return r


def calibrate(stats: LabelStats, min_positives: int = 5, shrink: float = SHRINK,
              head_weight: float = HEAD_WEIGHT) -> Calibration:
    """The per-label lookup tables (see the module docstring). A label is audited
    when it has at least ``min_positives`` labelled positives and as many negatives."""
    pos, neg = stats.pos.astype(np.float64), stats.neg.astype(np.float64)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    audited = (n_pos >= min_positives) & (n_neg >= min_positives)
    z = bin_logits()
    safe_pos, safe_neg = np.maximum(n_pos, 1), np.maximum(n_neg, 1)
    m1, m0 = (pos * z).sum(1) / safe_pos, (neg * z).sum(1) / safe_neg
    within = (pos * (z - m1[:, None]) ** 2).sum(1) + (neg * (z - m0[:, None]) ** 2).sum(1)
    dof = np.maximum(n_pos + n_neg - 2, 1)
    w = np.where(audited, n_pos, 0.0)
    gap = m1 - m0
    pooled_gap = float((w * gap).sum() / max(w.sum(), 1.0))
    pooled_var = float(within[audited].sum() / max(dof[audited].sum(), 1.0)) if audited.any() else 1.0
    # a label the head cannot separate (gap <= 0) gets a flat model: its scores say nothing
    gap = np.maximum((n_pos * gap + shrink * pooled_gap) / (n_pos + shrink), 0.0)
    var = np.maximum((n_pos * within / dof + shrink * pooled_var) / (n_pos + shrink), 1e-6)
    llr = (gap / var)[:, None] * (z[None, :] - (m0 + gap / 2)[:, None])  # log f_pos(z) / f_neg(z)
    prior = np.log(safe_pos / safe_neg)[:, None]

    total = max(float(n_pos[audited].sum()), 1.0)
    a = audited[:, None]
    rho = _rate(np.where(a, neg, 0.0), prior + llr, total)
    phi = _rate(np.where(a, pos, 0.0), -llr, total)
    missing_lo = np.log(rho) + (1 - head_weight) * (prior + llr) + head_weight * z[None, :]
    wrong_lo = np.log(phi) - (1 - head_weight) * llr + head_weight * (prior - z[None, :])
    est_missing = np.where(audited, (neg * _sigmoid(np.log(rho) + prior + llr)).sum(1), 0.0)
    est_wrong = np.where(audited, (pos * _sigmoid(wrong_lo)).sum(1), 0.0)
    return Calibration(_sigmoid(missing_lo).astype(np.float32), _sigmoid(wrong_lo).astype(np.float32), audited,
                       rho, phi, est_missing, est_wrong)

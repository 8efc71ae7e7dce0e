"""How suspicious a label is, comparable across labels: numpy only, mergeable statistics.

Each label's out-of-fold scores are summarised as two histograms on the logit
scale, one of its labelled positives and one of its labelled negatives
(``LabelStats``: built part by part, merged by addition, so no N x C matrix is
ever held in one place). From them, for a pair of label j with score p:

* **missing** (labelled 0): of the labelled negatives scoring at least p, the
  estimated share that are positives someone forgot. Forgotten positives score
  like the labelled positives, and their number is taken as a share rho of
  the label's positives (keywords are forgotten in proportion to their use), so
  that share is  rho * n_pos * S_pos(p) / (n_neg * S_neg(p)),  with S the
  share of scores >= p.
* **wrong** (labelled 1): of the labelled positives scoring at most p, the
  estimated share that are tags put on the wrong picture. Those score like
  the label's negatives, their number a share phi of its positives:
  phi * F_neg(p) / F_pos(p),  with F the share of scores <= p.

Both are estimated shares of errors, so they read the same on a frequent label
and on a rare one; each is made monotone in p per label, and the suspicion is
1 - exp(-share): the share itself while small, below 1 always, in the same
order. rho and phi are pooled over the audited labels from confident-learning
counts: labelled negatives scoring at least the mean score of the label's
labelled positives count as forgotten, labelled positives scoring at most the
mean score of its negatives as wrong. ``benchmarks/audit.py`` compares this ranking with
plain disagreement |y - p|, per-label confident-learning thresholds and
cleanlab's multi-label label-quality scores on the same out-of-fold scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOGIT_RANGE = 16.0  # scores are binned on logit(p) in [-16, 16]: sigmoid outputs beyond are 1e-7 from 0 or 1
BINS = 2048  # 1/64 of a logit per bin
MISSING, WRONG = "missing", "wrong"


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


def bin_centers() -> np.ndarray:
    """The score (probability) at the middle of each bin."""
    logit = (np.arange(BINS) + 0.5) * (2 * LOGIT_RANGE / BINS) - LOGIT_RANGE
    return 1.0 / (1.0 + np.exp(-logit))


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


def calibrate(stats: LabelStats, min_positives: int = 5) -> Calibration:
    """The per-label lookup tables (see the module docstring). A label is audited
    when it has at least ``min_positives`` labelled positives and as many negatives."""
    pos, neg = stats.pos.astype(np.float64), stats.neg.astype(np.float64)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    audited = (n_pos >= min_positives) & (n_neg >= min_positives)
    pos_ge = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]  # labelled positives scoring in this bin or above
    neg_ge = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
    pos_le = np.cumsum(pos, axis=1)
    neg_le = np.cumsum(neg, axis=1)
    safe_pos = np.maximum(n_pos, 1)[:, None]
    safe_neg = np.maximum(n_neg, 1)[:, None]
    # a pair is its own witness: a labelled-0 pair is among the negatives at or above its score
    s_pos, s_neg = pos_ge / safe_pos, np.maximum(neg_ge, 1) / safe_neg
    f_pos, f_neg = np.maximum(pos_le, 1) / safe_pos, neg_le / safe_neg

    # Confident-learning counts: a labelled negative scoring at least the mean score
    # of the label's labelled positives is counted as forgotten; a labelled positive
    # scoring at most the mean score of its negatives, as a wrong tag.
    rows = np.arange(len(n_pos))
    centers = bin_centers()
    t1 = score_bins((pos * centers).sum(1) / np.maximum(n_pos, 1))
    t0 = score_bins((neg * centers).sum(1) / np.maximum(n_neg, 1))
    est_missing = np.where(audited, neg_ge[rows, t1], 0.0)
    est_wrong = np.where(audited, pos_le[rows, t0], 0.0)
    total = max(float(n_pos[audited].sum()), 1.0)
    rho = float(est_missing.sum() / total)
    phi = float(est_wrong.sum() / total)

    missing = rho * n_pos[:, None] * s_pos / (n_neg[:, None] * s_neg + 1e-12)
    wrong = phi * f_neg / f_pos
    # monotone in the score: a labelled-0 pair is never less suspicious than one scoring lower
    missing = np.maximum.accumulate(missing, axis=1)
    wrong = np.maximum.accumulate(wrong[:, ::-1], axis=1)[:, ::-1]
    # x, the estimated share, can exceed 1 where the counts are loose; 1 - exp(-x) keeps
    # the order (no ties at a cap), is x for small x, and stays below 1
    missing, wrong = -np.expm1(-missing), -np.expm1(-wrong)
    return Calibration(missing.astype(np.float32), wrong.astype(np.float32), audited, rho, phi,
                       est_missing, est_wrong)

"""The multi-label metric set, the trivial baselines, and collapse detection.

Plain numpy + scikit-learn, testable without Ray. Rates are fractions in [0, 1]
as scikit-learn gives them. Every threshold metric is also computed for two
predictors that do nothing: ``all_negative`` (never predicts a label) and
``prior`` (each label's training frequency as its score), so a number is always
read against what doing nothing scores. A model that predicts all zeros on a
1%-dense data set has 99% "accuracy" (1 - hamming loss); its f1_micro is 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

from mlray.model.thresholds import top_k_mask

THRESHOLD_KEYS = (
    "hamming_loss", "subset_accuracy", "precision_micro", "recall_micro", "f1_micro", "f1_macro",
    "f1_samples", "jaccard_samples", "CP", "CR", "CF1", "OP", "OR", "OF1",
)


def _as_thresholds(thresholds: float | Sequence[float] | np.ndarray, n_labels: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim == 0:
        return np.full(n_labels, float(t))
    if t.shape != (n_labels,):
        raise ValueError(f"thresholds: expected one float or {n_labels} values, got shape {t.shape}")
    return t


def average_precision_per_label(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """AP of each label; NaN where the label has no positives (AP is undefined).

    The same definition as scikit-learn's ``average_precision_score`` (the sum
    over distinct score thresholds of recall gained times precision; tied scores
    form one threshold), for all labels at once: a per-label sklearn loop took
    0.4 s for 101 labels, which per-pass head selection pays hundreds of times."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(targets).astype(bool)
    n, c = y.shape
    ap = np.full(c, np.nan)
    npos = y.sum(axis=0)
    if n == 0 or not npos.any():
        return ap
    order = np.argsort(-s, axis=0, kind="stable")
    ss = np.take_along_axis(s, order, axis=0)
    ys = np.take_along_axis(y, order, axis=0)
    tp = np.cumsum(ys, axis=0)
    # each position's tie group ends at the last position with the same score
    last = np.ones((n, c), dtype=bool)
    last[:-1] = ss[1:] != ss[:-1]
    end = np.where(last, np.arange(n)[:, None], n)
    end = np.minimum.accumulate(end[::-1], axis=0)[::-1]
    precision_at_end = np.take_along_axis(tp, end, axis=0) / (end + 1.0)
    has = npos > 0
    ap[has] = (precision_at_end * ys).sum(axis=0)[has] / npos[has]
    return ap


def _paper_style(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """CP/CR/CF1 (per class, averaged) and OP/OR/OF1 (overall), as in the ML-GCN line of papers."""
    tp = (pred & y).sum(axis=0).astype(np.float64)
    npred = pred.sum(axis=0).astype(np.float64)
    npos = y.sum(axis=0).astype(np.float64)
    cp = float(np.mean(np.divide(tp, npred, out=np.zeros_like(tp), where=npred > 0)))
    cr = float(np.mean(np.divide(tp, npos, out=np.zeros_like(tp), where=npos > 0)))
    op = float(tp.sum() / npred.sum()) if npred.sum() else 0.0
    orr = float(tp.sum() / npos.sum()) if npos.sum() else 0.0
    f = lambda p, r: 2 * p * r / (p + r) if p + r else 0.0  # noqa: E731
    return {"CP": cp, "CR": cr, "CF1": f(cp, cr), "OP": op, "OR": orr, "OF1": f(op, orr)}


def threshold_metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Metrics of a 0/1 prediction matrix against multi-hot targets."""
    pred, y = pred.astype(bool), y.astype(bool)
    out = {
        "hamming_loss": float(skm.hamming_loss(y, pred)),
        "subset_accuracy": float(skm.accuracy_score(y, pred)),
        "precision_micro": float(skm.precision_score(y, pred, average="micro", zero_division=0)),
        "recall_micro": float(skm.recall_score(y, pred, average="micro", zero_division=0)),
        "f1_micro": float(skm.f1_score(y, pred, average="micro", zero_division=0)),
        "f1_macro": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
        "f1_samples": float(skm.f1_score(y, pred, average="samples", zero_division=0)),
        "jaccard_samples": float(skm.jaccard_score(y, pred, average="samples", zero_division=0)),
    }
    out.update(_paper_style(pred, y))
    return out


def ranking_metrics(scores: np.ndarray, y: np.ndarray) -> dict[str, float]:
    ap = average_precision_per_label(scores, y)
    has_pos = y.sum(axis=1) > 0
    top1 = np.argmax(scores, axis=1)
    one_error = float(np.mean(y[has_pos, top1[has_pos]] == 0)) if has_pos.any() else float("nan")
    nonempty = has_pos.any()
    return {
        "mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        "micro_AP": float(skm.average_precision_score(y.ravel(), scores.ravel())) if y.any() else float("nan"),
        "coverage_error": float(skm.coverage_error(y, scores)) if nonempty else float("nan"),
        "ranking_loss": float(skm.label_ranking_loss(y, scores)),
        "lrap": float(skm.label_ranking_average_precision_score(y, scores)),
        "one_error": one_error,
        "labels_with_positives": int(np.isfinite(ap).sum()),
        "labels_without_positives": int((~np.isfinite(ap)).sum()),
    }


def prior_scores(prior: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """The label-prior predictor: each label's training frequency, for every image.

    A tiny per-label offset breaks ties, so that rankings follow frequency."""
    p = np.asarray(prior, dtype=np.float64)
    return np.broadcast_to(p + 1e-9 * np.arange(len(p))[::-1] / max(len(p), 1), (n, len(p))).copy()


def multilabel_metrics(
    scores: np.ndarray,
    targets: np.ndarray,
    thresholds: float | Sequence[float] | np.ndarray = 0.5,
    *,
    top_k: int = 3,
    prior: Sequence[float] | np.ndarray | None = None,
    predictions: np.ndarray | None = None,
) -> dict[str, float]:
    """The full metric set as one flat dict.

    Keys: ranking (``mAP``, ``micro_AP``, ``coverage_error``, ``ranking_loss``,
    ``lrap``, ``one_error``), threshold metrics at ``thresholds`` (see
    ``THRESHOLD_KEYS``), the paper-style ones again at top-k (``CP_top3`` ...),
    ``pred_per_image``/``true_per_image``, and baselines under ``all_negative.*``
    and ``prior.*`` (the latter also with ``prior.mAP``). ``prior`` defaults to
    the label frequency of ``targets`` itself. ``predictions`` (N, C booleans)
    replaces ``scores >= thresholds`` when a policy decides otherwise (top-k,
    at least one label per image).
    """
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(targets).astype(bool)
    if scores.shape != y.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {y.shape} must both be (N, C)")
    n, c = y.shape
    t = _as_thresholds(thresholds, c)
    pred = scores >= t if predictions is None else np.asarray(predictions, dtype=bool)
    out: dict[str, float] = {"n_images": n, "n_labels": c}
    out.update(ranking_metrics(scores, y))
    out.update(threshold_metrics(pred, y))
    for k, v in _paper_style(top_k_mask(scores, top_k), y).items():
        out[f"{k}_top{top_k}"] = v
    out["pred_per_image"] = float(pred.sum(axis=1).mean())
    out["true_per_image"] = float(y.sum(axis=1).mean())
    out["images_without_prediction"] = float((pred.sum(axis=1) == 0).mean())
    for k, v in threshold_metrics(np.zeros_like(y), y).items():
        out[f"all_negative.{k}"] = v
    p = y.mean(axis=0) if prior is None else np.asarray(prior, dtype=np.float64)
    ps = prior_scores(p, n)
    out["prior.mAP"] = ranking_metrics(ps, y)["mAP"]
    for k, v in threshold_metrics(ps >= t, y).items():
        out[f"prior.{k}"] = v
    return out


def collapse_report(
    metrics: dict[str, float],
    scores: np.ndarray,
    thresholds: float | Sequence[float] | np.ndarray,
    vocab: Sequence[str],
    targets: np.ndarray,
    *,
    map_margin: float = 0.02,
    predictions: np.ndarray | None = None,
    history: Sequence[dict] = (),
    settings: dict | None = None,
) -> dict:
    """Say whether the model is no better than doing nothing and, from the run's
    own evidence (``history``: the per-epoch records; ``settings``: the run's
    ``config.training_facts``), what is likely behind it."""
    y = np.asarray(targets).astype(bool)
    if predictions is None:
        pred = np.asarray(scores) >= _as_thresholds(thresholds, y.shape[1])
    else:
        pred = np.asarray(predictions, dtype=bool)
    has_pos = y.sum(axis=0) > 0
    never = [vocab[j] for j in np.flatnonzero(has_pos & (pred.sum(axis=0) == 0))]
    reasons = []
    near_prior = np.isfinite(metrics.get("mAP", np.nan)) and metrics["mAP"] <= metrics["prior.mAP"] + map_margin
    if near_prior:
        reasons.append(
            f"mAP {metrics['mAP']:.3f} is within {map_margin} of the label-prior baseline "
            f"({metrics['prior.mAP']:.3f}): the ranking is no better than label frequency"
        )
    true_per = metrics["true_per_image"]
    silent = true_per > 0 and metrics["pred_per_image"] < 0.1 * true_per
    if silent:
        reasons.append(
            f"{metrics['pred_per_image']:.2f} predicted labels per image against {true_per:.2f} true: "
            "the model predicts (almost) all zeros at these thresholds"
        )
    if has_pos.sum() and len(never) > 0.5 * has_pos.sum():
        reasons.append(f"{len(never)} of {int(has_pos.sum())} labels are never predicted")
        silent = True
    advice = collapse_advice(history, settings or {}, near_prior=near_prior, silent=silent) if reasons else []
    return {"collapsed": bool(reasons), "reasons": reasons, "never_predicted": never, "advice": advice}


def collapse_advice(history: Sequence[dict], settings: dict, *, near_prior: bool, silent: bool) -> list[str]:
    """Likely causes the evidence supports, each with the change to try; nothing the
    settings already do. ``history`` records need ``epoch``, ``phase``, ``val_mAP``,
    ``prior_mAP`` and ``train_loss``."""
    out = []
    get = settings.get
    head = [h for h in history if h.get("phase") == "head"]
    full = [h for h in history if h.get("phase") not in (None, "head")]
    if head and full:
        best = max(head, key=lambda h: h["val_mAP"])
        last = full[-1]
        if best["val_mAP"] - last["val_mAP"] > max(0.02, 0.1 * best["val_mAP"]):
            mult = get("backbone_lr_mult")
            step = f"optim.backbone_lr_mult={mult / 5:.3g} (now {mult:g})" if mult else "a lower backbone LR"
            stages = "" if get("unfreeze_stages") in (1, 2) else ", or optim.unfreeze_stages=2 (train the last stages only)"
            out.append(
                f"val mAP fell from {best['val_mAP']:.3f} (epoch {best['epoch']}, head only) to "
                f"{last['val_mAP']:.3f} after the backbone unfroze: the backbone's updates destroy what the "
                f"head learned; try {step}{stages}"
            )
    elif history and not full and get("epochs") and get("freeze_epochs", 0) >= get("epochs"):
        out.append("the backbone never trained (optim.freeze_epochs >= optim.epochs): lower optim.freeze_epochs")
    if near_prior and history and all(h["val_mAP"] <= h["prior_mAP"] + 0.02 for h in history):
        first, last = history[0]["train_loss"], history[-1]["train_loss"]
        if len(history) > 1 and last < 0.8 * first:
            out.append(
                f"the training loss fell ({first:.4f} -> {last:.4f}) but val mAP never rose above the label "
                "prior's: the model learns the training rows only; check that train and val come from the same "
                "images and labels, and that labels are right"
            )
        else:
            lr = get("lr")
            out.append(
                f"neither the training loss ({first:.4f} -> {last:.4f}) nor val mAP moved from the label prior: "
                + (f"try optim.lr={lr / 3:.2g} (now {lr:g})" if lr else "try a lower optim.lr")
                + (" or more epochs" if len(history) < 3 else "")
            )
    if (near_prior or silent) and get("loss") == "bce":
        out.append("plain BCE lets the label prior dominate with rare labels: try loss.name=asl or bce_weighted")
    if silent:
        if get("at_least_one") is False:
            out.append("images get no label: thresholds.at_least_one=true gives each its top label")
        if get("threshold_strategy") == "global":
            out.append("one global threshold suits frequent labels only: try thresholds.strategy=per_label")
    return out


def format_collapse(report: dict, max_labels: int = 15) -> str:
    if not report["collapsed"]:
        return ""
    lines = ["WARNING model collapse: no better than a trivial predictor"]
    lines += [f"  - {r}" for r in report["reasons"]]
    if report["never_predicted"]:
        names = report["never_predicted"]
        lines.append(f"  never predicted: {names[:max_labels]}" + (" ..." if len(names) > max_labels else ""))
    lines += [f"  likely cause: {a}" for a in report["advice"]] or ["  no cause stands out in this run's history"]
    return "\n".join(lines)

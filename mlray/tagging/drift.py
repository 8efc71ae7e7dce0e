"""Drift: does tonight's corpus look like what the model was validated on?

A tagging run counts, per label, the images it tagged positive and each image's
highest score (``io.tagged.label_counts``, summed in the sink). The run
directory holds the same on the validation split at the tuned thresholds
(``model.rundir.val_profile``). The rules, both pure functions of counts:

* **a label drifted** when its share of images moved beyond ``factor`` either
  way. Counts below ``min_count`` are not evidence: the side with the higher
  share needs ``min_count`` positives, and the other side's count is taken as at
  least ``min_count``, so a share that rests on a few images is never the
  reason (a label 2 images have, against 0 on val, is not 'infinitely' up).
* **the mean top score shifted** when it moved by more than ``score_shift``
  (absolute) and by more than 3 standard errors of the difference (from the
  validation std), so a small run is not flagged for noise. A falling mean top
  score means the model is less sure of anything: images unlike its training set.

The report is a plain dict, written into ``_summary.json`` as ``drift``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

NO_PROFILE = "no validation profile in {run} (trained before drift checks): drift not checked"
Z_NOISE = 3.0  # standard errors a mean top score must move beyond, besides score_shift


def label_drift(run_count: int, run_images: int, val_count: int, val_images: int, factor: float,
                min_count: int) -> str | None:
    """``"up"``, ``"down"`` or None: whether a label's share of images moved beyond
    ``factor`` from validation to this run, by the rule of the module docstring."""
    if run_images <= 0 or val_images <= 0:
        return None
    run_share, val_share = run_count / run_images, val_count / val_images
    if run_count >= min_count and run_share > factor * max(val_count, min_count) / val_images:
        return "up"
    if val_count >= min_count and val_share > factor * max(run_count, min_count) / run_images:
        return "down"
    return None


def score_shift_drift(run_mean: float, run_images: int, val_mean: float, val_std: float, val_images: int,
                      shift: float) -> bool:
    """Whether the mean top score moved by more than ``shift`` and beyond noise."""
    if run_images <= 0 or val_images <= 0:
        return False
    delta = abs(run_mean - val_mean)
    noise = Z_NOISE * val_std * math.sqrt(1 / run_images + 1 / val_images)
    return delta > shift and delta > noise


def check_drift(counts: Mapping, profile: Mapping | None, vocab: Sequence[str], run: str, *, factor: float,
                min_count: int, score_shift: float, compare_labels: bool = True, incremental: bool = False) -> dict:
    """The drift report of one tagging run: ``counts`` (``io.tagged`` sink counts of
    the rows written now) against ``profile`` (``model.rundir.val_profile``, None
    when the run has none). ``compare_labels`` False: the run chose labels by
    another rule than the profile's thresholds (``--threshold``/``--top-k``), so
    only the top score is compared. ``incremental``: recorded, for the wording."""
    rule = {"factor": factor, "min_count": min_count, "score_shift": score_shift}
    n = int(counts.get("scored", 0))
    report: dict = {"checked": False, "drifted": False, "rule": rule, "images": n, "incremental": incremental,
                    "drifted_labels": []}
    if profile is None:
        return {**report, "reason": NO_PROFILE.format(run=run)}
    n_val = int(profile["images"])
    if n_val == 0:
        return {**report, "reason": f"the validation profile of {run} holds no images: drift not checked"}
    if n == 0:
        return {**report, "reason": "no image was scored in this run: drift not checked"}
    report["checked"] = True
    report["validation_images"] = n_val
    if compare_labels:
        positives = counts.get("positives", {})
        labels = {}
        for name, val_count in zip(vocab, profile["predicted_positives"]):
            k = int(positives.get(name, 0))
            moved = label_drift(k, n, int(val_count), n_val, factor, min_count)
            labels[name] = {"share": k / n, "val_share": val_count / n_val, "count": k, "val_count": int(val_count),
                            "drift": moved}
            if moved:
                report["drifted_labels"].append(name)
        report["labels"] = labels
    else:
        report["labels_not_compared"] = ("--threshold/--top-k chose the labels, not the thresholds the validation "
                                         "profile was counted at")
    top = None
    if profile.get("top_score_mean") is not None:
        mean = counts["top_sum"] / n
        std = math.sqrt(max(counts["top_sq_sum"] / n - mean * mean, 0.0))
        val_mean, val_std = float(profile["top_score_mean"]), float(profile["top_score_std"])
        top = {"mean": mean, "std": std, "val_mean": val_mean, "val_std": val_std, "shift": mean - val_mean,
               "drift": score_shift_drift(mean, n, val_mean, val_std, n_val, score_shift)}
    report["top_score"] = top
    report["drifted"] = bool(report["drifted_labels"]) or bool(top and top["drift"])
    return report


def format_drift(report: Mapping, max_listed: int = 10) -> str:
    """The summary's drift lines: what moved, or that nothing did, or why nothing was checked."""
    if not report.get("checked"):
        return report.get("reason", "drift not checked")
    n = report["images"]
    rule = report["rule"]
    scope = f"{n} images scored {'now (--incremental: new rows only)' if report.get('incremental') else 'in this run'}"
    lines = [f"drift vs validation ({report['validation_images']} images) over {scope}: "
             + ("DRIFT" if report["drifted"] else "none")
             + f" (rule: a label's share beyond {rule['factor']:g}x with >= {rule['min_count']} images; "
             f"mean top score beyond {rule['score_shift']:g})"]
    labels = report.get("labels")
    if labels is None:
        lines.append(f"  labels not compared: {report.get('labels_not_compared')}")
    elif report["drifted_labels"]:
        names = report["drifted_labels"]
        shown = ", ".join(f"{k} {labels[k]['share']:.3f} vs {labels[k]['val_share']:.3f} ({labels[k]['drift']})"
                          for k in names[:max_listed])
        more = f", and {len(names) - max_listed} more (_summary.json)" if len(names) > max_listed else ""
        lines.append(f"  labels drifted ({len(names)} of {len(labels)}; share now vs val): {shown}{more}")
    else:
        lines.append(f"  labels: all {len(labels)} within {rule['factor']:g}x of their val share")
    top = report.get("top_score")
    if top is not None:
        lines.append(f"  mean top score {top['mean']:.3f} vs {top['val_mean']:.3f} on val (shift {top['shift']:+.3f})"
                     + (": DRIFT" if top["drift"] else ""))
    return "\n".join(lines)

"""Drift in tagging: the pure rules, the counts a run and a validation split yield
for the same scores, and (slow) the whole check through ``mlray tag`` on a real run."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlray.io import tagged
from mlray.model import rundir
from mlray.model.thresholds import ThresholdPolicy
from mlray.tagging.drift import check_drift, format_drift, label_drift, score_shift_drift

RULE = {"factor": 3.0, "min_count": 10, "score_shift": 0.1}


def test_a_label_drifts_beyond_the_factor_both_ways_and_rare_counts_are_not_evidence():
    # 30% on val; 1,000 images tonight
    assert label_drift(300, 1000, 30, 100, 3.0, 10) is None  # same share
    assert label_drift(950, 1000, 30, 100, 3.0, 10) == "up"  # 95% > 3 x 30%
    assert label_drift(850, 1000, 30, 100, 3.0, 10) is None  # 2.8x: within the factor
    assert label_drift(50, 1000, 30, 100, 3.0, 10) == "down"  # 5% < 30% / 3
    assert label_drift(0, 1000, 30, 100, 3.0, 10) == "down"  # gone altogether
    assert label_drift(120, 1000, 30, 100, 3.0, 10) is None  # 12%: 2.5x down, within
    # a label val never predicted: up only once this run has min_count of it, and
    # then against a val share of min_count / val images (10%), not zero
    assert label_drift(5, 20, 0, 100, 3.0, 10) is None  # 25% of 20 images, but 5 images
    assert label_drift(200, 1000, 0, 100, 3.0, 10) is None  # 20% < 3 x 10%
    assert label_drift(400, 1000, 0, 100, 3.0, 10) == "up"
    # a label val saw 3 times: its share (3%) is not evidence of a fall to 0
    assert label_drift(0, 1000, 3, 100, 3.0, 10) is None
    # a small run can't show a label gone: 0 of 20 is no less than 10 of 20 here
    assert label_drift(0, 20, 30, 100, 3.0, 10) is None
    assert label_drift(0, 200, 30, 100, 3.0, 10) == "down"
    assert label_drift(0, 0, 30, 100, 3.0, 10) is None and label_drift(5, 10, 0, 0, 3.0, 1) is None
    # the factor and the minimum count are the caller's
    assert label_drift(120, 1000, 30, 100, 2.0, 10) == "down"
    assert label_drift(5, 20, 0, 100, 3.0, 5) == "up"


def test_the_mean_top_score_drifts_beyond_the_shift_and_beyond_noise():
    assert not score_shift_drift(0.78, 1000, 0.80, 0.1, 500, 0.1)
    assert score_shift_drift(0.62, 1000, 0.80, 0.1, 500, 0.1)
    assert score_shift_drift(0.95, 1000, 0.80, 0.05, 500, 0.1)  # up counts too
    # 0.2 lower over 4 images of a spread-out val: noise (3 SE = 0.31)
    assert not score_shift_drift(0.60, 4, 0.80, 0.25, 500, 0.1)
    assert score_shift_drift(0.60, 400, 0.80, 0.25, 500, 0.1)
    assert not score_shift_drift(0.1, 0, 0.80, 0.1, 500, 0.1)


def _scores(n: int, c: int, seed: int, boost: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = rng.beta(0.6, 2.0, size=(n, c)).astype(np.float32)
    if boost is not None:
        s[:, boost] = rng.uniform(0.7, 1.0, n)
    return s


def _tagged_counts(scores: np.ndarray, policy: ThresholdPolicy, vocab: list[str], errors: int = 0) -> dict:
    """Rows as a tagging run writes them (``score_rows``), counted as its sink counts them."""
    n = len(scores) + errors
    ok = np.array([True] * len(scores) + [False] * errors)
    cols = tagged.score_rows(pa.array([f"i{i}" for i in range(n)]), None,
                             pa.array([None] * len(scores) + ["not_an_image: x"] * errors, pa.string()),
                             scores, ok, policy, pa.array(vocab), "m@epoch1")
    table = pa.table(cols)
    total: dict = {}
    for start in range(0, n, 7):  # batches summed the way the sink sums its tasks
        tagged.add_counts(total, tagged.label_counts(table.slice(start, 7)))
    return total


def test_a_run_that_scores_like_validation_has_no_drift_and_one_that_does_not_is_named():
    vocab = ["cat", "dog", "car", "tree", "boat"]
    policy = ThresholdPolicy("global", [0.5] * 5, 0.5, at_least_one=True)
    val = _scores(400, 5, 0)
    profile = rundir.val_profile(val, policy, epoch=3)
    assert profile["images"] == 400 and profile["epoch"] == 3
    assert profile["predicted_positives"] == policy.predict(val).sum(axis=0).tolist()
    # the validation images themselves, tagged (with error rows, which count nowhere)
    same = _tagged_counts(val, policy, vocab, errors=5)
    assert same["scored"] == 400
    report = check_drift(same, profile, vocab, "RUN", **RULE)
    assert report["checked"] and not report["drifted"] and report["drifted_labels"] == []
    assert all(v["share"] == v["val_share"] for v in report["labels"].values())
    assert abs(report["top_score"]["shift"]) < 1e-6 and not report["top_score"]["drift"]
    assert "none" in format_drift(report).splitlines()[0]
    # a corpus where every image is a boat
    boats = _tagged_counts(_scores(600, 5, 1, boost=4), policy, vocab)
    report = check_drift(boats, profile, vocab, "RUN", **RULE)
    assert report["drifted"] and "boat" in report["drifted_labels"]
    assert report["labels"]["boat"]["drift"] == "up" and report["labels"]["boat"]["share"] == 1.0
    text = format_drift(report)
    assert "DRIFT" in text and "boat 1.000 vs" in text and "(up)" in text
    json.dumps(report)  # it goes into _summary.json as it is
    # --threshold / --top-k tag by another rule: only the top score is compared
    other = check_drift(boats, profile, vocab, "RUN", **RULE, compare_labels=False)
    assert "labels" not in other and other["drifted_labels"] == [] and "labels not compared" in format_drift(other)


def test_without_a_profile_drift_is_not_checked_and_says_why():
    report = check_drift({"scored": 10, "positives": {}, "top_sum": 5.0, "top_sq_sum": 3.0}, None, ["a"], "s3://b/r",
                         **RULE)
    assert not report["checked"] and not report["drifted"]
    assert format_drift(report) == "no validation profile in s3://b/r (trained before drift checks): drift not checked"


def test_the_profile_is_written_with_the_best_model_and_read_back_checked(tmp_path):
    import torch

    d = str(tmp_path / "run")
    policy = ThresholdPolicy("global", [0.5] * 3, 0.5)
    assert rundir.read_val_profile(d, 3) is None  # a run from before profiles
    rundir.write_best(d, {"w": torch.zeros(2)}, policy, 2, {"mAP": 0.5}, {"epoch": 2},
                      val_scores=_scores(50, 3, 0))
    doc = rundir.read_val_profile(d, 3)
    assert doc["epoch"] == rundir.read_best(d)["epoch"] == 2 and doc["images"] == 50
    with pytest.raises(ValueError, match="val_profile.json: 3 labels, but labels.json has 4"):
        rundir.read_val_profile(d, 4)
    open(os.path.join(d, rundir.PROFILE), "w").write("{not json")
    with pytest.raises(ValueError, match="val_profile.json: not a validation profile"):
        rundir.read_val_profile(d, 3)


@pytest.mark.slow
def test_tag_names_drift_in_a_corpus_unlike_validation_and_exits_3_only_then(trained_run, local_ray, tmp_path, capsys):
    """Through the CLI on a real 2-epoch run: its validation split tagged again
    matches its profile; mosaics of one digit each drift, and --fail-on-drift
    exits 3 after writing OUT and _summary.json; a run without a profile says so."""
    import pyarrow.compute as pc

    from mlray.cli import DRIFT_EXIT, main
    from mlray.io.manifest import read_manifest, write_manifest

    run, manifest, _ = trained_run
    table, vocab = read_manifest(manifest)
    profile = rundir.read_val_profile(run, len(vocab))
    val = table.filter(pc.equal(table.column("split"), "val"))
    assert profile is not None and profile["images"] == val.num_rows  # ~90 images, 20-70 per label predicted
    assert profile["epoch"] == rundir.read_best(run)["epoch"]
    args = ["--fail-on-drift", "--drift-min-count", "5"]

    def tag_cli(model: str, rows: pa.Table, name: str) -> tuple[int, dict, str]:
        m, out = str(tmp_path / f"{name}-manifest"), str(tmp_path / name)
        write_manifest(rows, vocab, m)
        capsys.readouterr()
        rc = main(["tag", "--model", model, "--input", m, "--out", out, *args])
        summary = json.loads(open(os.path.join(out, "_summary.json")).read())
        assert summary["rows_written"] == rows.num_rows == pq.read_table(out).num_rows  # written, drift or not
        return rc, summary, capsys.readouterr().out

    rc, summary, printed = tag_cli(run, val, "val")
    drift = summary["drift"]
    assert rc == 0 and drift["checked"] and not drift["drifted"], printed
    n = val.num_rows
    assert drift["images"] == n and set(drift["labels"]) == set(vocab)
    for label, d in drift["labels"].items():  # the same images at the same thresholds: the same shares
        assert abs(d["share"] - d["val_share"]) <= 2 / n, (label, d)
    assert abs(drift["top_score"]["shift"]) < 0.01
    assert "drift vs validation" in printed and ": none" in printed

    # a corpus of mosaics that each hold one digit (validation's hold 1 to 4): every
    # label is rarer, and the model tags several of them less than a third as often
    one = table.filter(pa.array([len(labels) == 1 for labels in table.column("labels").to_pylist()]))
    rc, summary, printed = tag_cli(run, one, "one")  # every split: ~145 mosaics
    drift = summary["drift"]
    assert rc == DRIFT_EXIT and drift["drifted"] and drift["images"] == one.num_rows, printed
    moved = drift["drifted_labels"]
    assert moved and all(drift["labels"][d]["drift"] == "down" for d in moved), drift["labels"]
    assert all(drift["labels"][d]["share"] < drift["labels"][d]["val_share"] / 3 for d in moved)
    assert sum(d["share"] for d in drift["labels"].values()) < sum(d["val_share"] for d in drift["labels"].values())
    assert drift["top_score"]["shift"] < 0  # and it is less sure of what it sees
    assert "drift vs validation" in printed and ": DRIFT" in printed
    line = next(x for x in printed.splitlines() if "labels drifted" in x)
    assert all(f"{d} {drift['labels'][d]['share']:.3f} vs" in line for d in moved) and "(down)" in line

    # a run trained before drift checks: tagged as ever, one line says drift was not checked
    old = shutil.copytree(run, str(tmp_path / "old-run"), ignore=shutil.ignore_patterns("checkpoint_*"))
    os.remove(os.path.join(old, rundir.PROFILE))
    rc, summary, printed = tag_cli(old, one, "old")
    assert rc == 0 and not summary["drift"]["checked"] and summary["complete"]
    assert printed.count("drift not checked") == 1
    assert f"no validation profile in {old} (trained before drift checks): drift not checked" in printed

"""Multi-label iterative stratification: rare labels everywhere, proportions kept."""

from __future__ import annotations

import numpy as np
import pytest

from mlray.data.splits import iterative_split, parse_ratios


def _generated(n=3000, n_labels=50, seed=0):
    rng = np.random.default_rng(seed)
    # Zipf-like label frequencies down to a handful of positives.
    freq = 0.3 / (1 + np.arange(n_labels)) ** 1.1
    y = rng.random((n, n_labels)) < freq
    y[:, -5:] = False
    for j, count in zip(range(n_labels - 5, n_labels), (3, 3, 4, 5, 7)):
        y[rng.choice(n, count, replace=False), j] = True
    return [list(np.flatnonzero(row)) for row in y], y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_label_with_three_positives_is_in_every_split(seed):
    labels, y = _generated(seed=seed)
    ratios = parse_ratios("train=0.8,val=0.1,test=0.1")
    assigned = np.array(iterative_split(labels, y.shape[1], ratios, seed=seed))
    counts = y.sum(axis=0)
    for split, frac in ratios.items():
        mask = assigned == split
        assert abs(mask.mean() - frac) < 0.02, (split, mask.mean())
        per_label = y[mask].sum(axis=0)
        missing = np.flatnonzero((counts >= 3) & (per_label == 0))
        assert len(missing) == 0, f"labels {missing} (counts {counts[missing]}) missing from {split}"
        common = counts >= 100
        share = per_label[common] / counts[common]
        assert np.all(np.abs(share - frac) < 0.04), (split, share)


def test_groups_never_straddle_splits_and_result_is_deterministic():
    labels, y = _generated(n=1000, seed=5)
    groups = [f"h{i // 3}" if i < 300 else None for i in range(1000)]  # 100 triplets of copies
    ratios = parse_ratios("train=0.8,val=0.1,test=0.1")
    a = iterative_split(labels, y.shape[1], ratios, groups=groups, seed=7)
    b = iterative_split(labels, y.shape[1], ratios, groups=groups, seed=7)
    assert a == b
    for g in range(100):
        assert len({a[3 * g], a[3 * g + 1], a[3 * g + 2]}) == 1
    c = iterative_split(labels, y.shape[1], ratios, groups=groups, seed=8)
    assert a != c


def test_parse_ratios_errors():
    assert parse_ratios("train=8,val=1,test=1") == pytest.approx({"train": 0.8, "val": 0.1, "test": 0.1})
    with pytest.raises(ValueError, match="expected name=fraction"):
        parse_ratios("train")
    with pytest.raises(ValueError, match="not a number"):
        parse_ratios("train=x")


def test_parse_ratios_names_what_is_wrong():
    assert parse_ratios("train=3,val=1,") == pytest.approx({"train": 0.75, "val": 0.25})  # a trailing comma is fine
    with pytest.raises(ValueError, match="unknown split 'dev'; use train, val and test"):
        parse_ratios("train=0.8,dev=0.2")
    with pytest.raises(ValueError, match="fraction for 'val' is negative"):
        parse_ratios("train=1,val=-0.1")
    with pytest.raises(ValueError, match="must sum to more than 0"):
        parse_ratios("train=0,val=0")


def test_rows_without_labels_fill_each_split_to_its_share():
    """Unlabelled rows (and whole unlabelled groups) go where a split still wants rows;
    a split with a zero share gets none."""
    labels = [[0] if i < 40 else [] for i in range(400)]
    groups = [f"g{i // 4}" if i >= 200 else None for i in range(400)]  # 50 unlabelled groups of 4
    ratios = parse_ratios("train=0.5,val=0.5,test=0")
    got = iterative_split(labels, 1, ratios, groups=groups, seed=1)
    assert abs(got.count("train") - 200) <= 4 and "test" not in got  # within one group of its share
    assert got[:40].count("train") == got[:40].count("val") == 20  # the labelled rows split evenly too
    assert all(len({got[i], got[i + 1], got[i + 2], got[i + 3]}) == 1 for i in range(200, 400, 4))

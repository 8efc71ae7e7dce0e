"""Multi-label iterative stratification over groups of identical images.

This follows Sechidis et al. (2011), "On the stratification of multi-label data":
labels are handled rarest first, and each example carrying the current label goes
to the split that still wants most of that label. Two changes make it fit mlray:

* the unit is a *group* (all copies of one picture, by content hash), so copies
  never straddle train and test;
* every label with at least as many positive groups as there are splits gets at
  least one positive in each split (its quota per split is raised to 1), so rare
  labels can be evaluated at all.

The maintained libraries (``iterative-stratification``, ``scikit-multilearn``)
split rows two ways at a time and know neither groups nor minimum quotas, hence
this small implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def parse_ratios(spec: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> ratios normalised to sum to 1."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"--split {spec!r}: expected name=fraction pairs, e.g. train=0.8,val=0.1,test=0.1")
        name, value = part.split("=", 1)
        name = name.strip()
        if name not in ("train", "val", "test"):
            raise ValueError(f"--split {spec!r}: unknown split {name!r}; use train, val and test")
        try:
            out[name] = float(value)
        except ValueError as e:
            raise ValueError(f"--split {spec!r}: {value!r} is not a number") from e
        if out[name] < 0:
            raise ValueError(f"--split {spec!r}: fraction for {name!r} is negative")
    total = sum(out.values())
    if total <= 0:
        raise ValueError(f"--split {spec!r}: fractions must sum to more than 0")
    return {k: v / total for k, v in out.items()}


def iterative_split(
    labels: Sequence[Sequence[int]],
    n_labels: int,
    ratios: dict[str, float],
    *,
    groups: Sequence[str | None] | None = None,
    seed: int = 0,
) -> list[str]:
    """Assign each row a split name.

    ``labels[i]`` holds the label indices of row ``i``; rows sharing a non-null
    ``groups`` key (e.g. a content hash) always land in the same split.
    """
    rng = np.random.default_rng(seed)
    names = [k for k, v in ratios.items() if v > 0]
    r = np.array([ratios[k] for k in names])
    n = len(labels)
    # Build groups: rows with the same key, singletons otherwise.
    key_to_group: dict[str, int] = {}
    row_group = np.empty(n, dtype=np.int64)
    group_rows: list[list[int]] = []
    for i in range(n):
        key = groups[i] if groups is not None else None
        if key is not None and key in key_to_group:
            g = key_to_group[key]
            group_rows[g].append(i)
        else:
            g = len(group_rows)
            group_rows.append([i])
            if key is not None:
                key_to_group[key] = g
        row_group[i] = g
    n_groups = len(group_rows)
    group_size = np.array([len(rows) for rows in group_rows], dtype=np.float64)
    group_labels: list[set[int]] = [set() for _ in range(n_groups)]
    for i in range(n):
        group_labels[row_group[i]].update(labels[i])

    # Per-label group counts and the groups holding each label.
    label_groups: list[list[int]] = [[] for _ in range(n_labels)]
    for g, ls in enumerate(group_labels):
        for lab in ls:
            label_groups[lab].append(g)
    counts = np.array([len(x) for x in label_groups], dtype=np.float64)

    k = len(names)
    want_rows = r * n
    want_label = np.outer(counts, r)  # (L, k)
    rare_enough = counts >= k
    floor = np.where(want_label < 1.0, 1.0, want_label)
    # Raise tiny quotas to one positive per split; take the excess from the largest.
    for lab in np.nonzero(rare_enough & (want_label < 1.0).any(axis=1))[0]:
        q = floor[lab].copy()
        excess = q.sum() - counts[lab]
        big = np.argsort(-q)
        for j in big:
            take = min(excess, max(0.0, q[j] - 1.0))
            q[j] -= take
            excess -= take
            if excess <= 1e-9:
                break
        want_label[lab] = q

    assignment = np.full(n_groups, -1, dtype=np.int64)
    remaining = counts.copy()
    while True:
        active = np.nonzero(remaining > 0)[0]
        if len(active) == 0:
            break
        lab = active[np.argmin(remaining[active])]
        todo = [g for g in label_groups[lab] if assignment[g] < 0]
        rng.shuffle(todo)
        for g in todo:
            cand = np.flatnonzero(want_label[lab] == want_label[lab].max())
            if len(cand) > 1:
                sub = want_rows[cand]
                cand = cand[sub == sub.max()]
            j = int(rng.choice(cand)) if len(cand) > 1 else int(cand[0])
            assignment[g] = j
            want_rows[j] -= group_size[g]
            for other in group_labels[g]:
                want_label[other, j] -= 1
                remaining[other] -= 1
        remaining[lab] = 0
    # Groups without labels: fill what each split still wants.
    for g in rng.permutation(np.nonzero(assignment < 0)[0]):
        j = int(np.argmax(want_rows))
        assignment[g] = j
        want_rows[j] -= group_size[g]
    return [names[assignment[row_group[i]]] for i in range(n)]

"""Cross-validation folds over content-hash groups: numpy only, no Python loop per row.

Copies of one picture (same ``content_hash``) always share a fold: a copy in the
training folds would let a head memorise the very label it is asked to judge.
Groups are dealt round-robin in order of their rarest label (ties in a seeded
random order), so every label's positives spread over the folds as evenly as
the groups allow; rows are stored grouped by category in most exports, and the
order they come in never decides a fold.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def content_groups(image_ids: pa.Array | pa.ChunkedArray, hashes: pa.Array | pa.ChunkedArray | None) -> np.ndarray:
    """A group number per row: rows with the same content hash share one; a row
    without a hash is a group of its own."""
    ids = image_ids.combine_chunks() if isinstance(image_ids, pa.ChunkedArray) else image_ids
    if hashes is None:
        return np.arange(len(ids), dtype=np.int64)
    h = hashes.combine_chunks() if isinstance(hashes, pa.ChunkedArray) else hashes
    # a null hash is keyed by the row's id, which no hash can equal (ids are unique)
    key = pc.coalesce(pc.binary_join_element_wise("h:", h, ""), pc.binary_join_element_wise("i:", ids, ""))
    return pc.index_in(key, value_set=pc.unique(key)).to_numpy().astype(np.int64)


def rarest_label(labels: pa.ListArray | pa.ChunkedArray, vocab: list[str]) -> np.ndarray:
    """Per row, the number of positives of its rarest label (a large number for rows without labels)."""
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    n = len(labels)
    flat = pc.list_flatten(labels)
    idx = pc.fill_null(pc.index_in(flat, value_set=pa.array(vocab, pa.string())), -1).to_numpy()
    rows = pc.list_parent_indices(labels).to_numpy()
    keep = idx >= 0
    counts = np.bincount(idx[keep], minlength=len(vocab))
    out = np.full(n, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(out, rows[keep], counts[idx[keep]])
    return out


def assign_folds(groups: np.ndarray, k: int, *, seed: int = 0, rarity: np.ndarray | None = None) -> np.ndarray:
    """The fold (0..k-1) of each row. ``groups``: a group number per row (rows of one
    group share a fold); ``rarity``: per row, lower for rows of rarer labels (a
    group takes its rarest row's). Refuses ``k`` < 2 or more folds than groups."""
    groups = np.asarray(groups, np.int64)
    if k < 2:
        raise ValueError(f"--folds {k}: must be at least 2 (each image is scored by a head fitted on the others)")
    uniq, g = np.unique(groups, return_inverse=True)
    n_groups = len(uniq)
    if n_groups < k:
        raise ValueError(f"--folds {k}: the manifest holds only {n_groups} distinct images (content-hash groups), "
                         f"and copies of one image share a fold; use --folds {max(2, n_groups)} or fewer, or "
                         "audit more images")
    key = np.zeros(n_groups, np.int64)
    if rarity is not None:
        key[:] = np.iinfo(np.int64).max
        np.minimum.at(key, g, np.asarray(rarity, np.int64))
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(n_groups), key))  # rarest first, random among equals
    group_fold = np.empty(n_groups, np.int64)
    # round-robin from a random fold, so fold 0 is not always the one given the rarest group
    group_fold[order] = (np.arange(n_groups) + int(rng.integers(k))) % k
    return group_fold[g]

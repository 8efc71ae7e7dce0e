"""The audit's Ray tasks: each works on one part of the stored embeddings, or one fold.

The driver holds the manifest's ids, labels and folds, never the embeddings:

* ``sample_part``: a part's rows chosen to fit heads on (all of them unless the
  corpus is larger than ``max_fit_rows`` per head), as float16, into the object store;
* ``fit_fold``: one fold's head (``training.head.fit_head``, the run's loss),
  fitted on the other folds' sampled rows and stopped early on a held-out
  share of their groups;
* ``score_part``: a part's rows scored by the head of their own fold (so no
  image is scored by a head that saw its labels), written as out-of-fold
  scores, summarised as per-label histograms (``suspicion.LabelStats``);
* ``candidate_part``: the pairs of an out-of-fold part whose suspicion passes
  the floor, written sorted by suspicion, with a histogram of their suspicions
  (the driver's bounded-memory merge reads it to cut ranges).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlray.audit.suspicion import MISSING, WRONG, Calibration, LabelStats
from mlray.io import storage
from mlray.io.manifest import multi_hot

SUSPICION_BINS = 10_000  # histogram of candidate suspicions, for cutting the merge into ranges


def _embeddings(uri: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The part's embeddings (float16) of the rows the driver assigned to it
    (``rows``: manifest row per part row, -1 for rows to skip): (rows, (n, D))."""
    t = storage.read_table(uri, columns=["embedding"])
    emb = t.column("embedding").combine_chunks()
    take = np.flatnonzero(rows >= 0)
    values = pc.list_flatten(emb.take(pa.array(take))).to_numpy(zero_copy_only=False)
    dim = len(values) // max(len(take), 1)
    return rows[take], values.reshape(len(take), dim).astype(np.float16, copy=False)


def sample_part(uri: str, rows: np.ndarray, sampled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The part's rows whose ``sampled`` flag is set, with their embeddings."""
    keep = rows.copy()
    keep[keep >= 0] = np.where(sampled[keep[keep >= 0]], keep[keep >= 0], -1)
    return _embeddings(uri, keep)


def fit_fold(fold: int, folds: np.ndarray, stop: np.ndarray, labels: pa.ListArray, vocab: list[str], cfg, head_opts,
             threads: int, *samples: tuple[np.ndarray, np.ndarray]) -> dict:
    """Fit fold ``fold``'s head on the sampled rows of the other folds (``samples``:
    ``sample_part``'s results) with ``cfg``'s loss; early stop on those of them in
    the held-out ``stop`` share. Returns the head as numpy arrays."""
    import torch

    from mlray.training.head import fit_head

    torch.set_num_threads(max(1, threads))
    rows = np.concatenate([r for r, _ in samples]) if samples else np.zeros(0, np.int64)
    emb = np.concatenate([e for _, e in samples]) if samples else np.zeros((0, 1), np.float16)
    other = folds[rows] != fold
    device = torch.device(head_opts.device or "cpu")
    x, y = {}, {}
    for name, sel in (("train", other & ~stop[rows]), ("val", other & stop[rows])):
        x[name] = torch.from_numpy(emb[sel].astype(np.float32)).to(device)
        y[name] = torch.from_numpy(multi_hot(labels.take(pa.array(rows[sel])), vocab)).float().to(device)
    del emb
    positives = y["train"].sum(0).long().cpu().tolist()
    n_train = len(x["train"])
    head, best_epoch, history = fit_head(x, y, cfg, positives, n_train, head_opts)
    return {
        "fold": fold, "weight": head.weight.detach().float().cpu().numpy(),
        "bias": head.bias.detach().float().cpu().numpy(), "best_epoch": best_epoch, "epochs": len(history),
        "train_rows": n_train, "stop_rows": len(x["val"]), "val_mAP": history[best_epoch - 1]["val_mAP"],
    }


def score_part(uri: str, rows: np.ndarray, heads: list[dict], folds: np.ndarray, ids: pa.Array,
               labels: pa.ListArray, vocab: list[str], out: str) -> dict:
    """Score a part's rows with their own fold's head; write ``image_id, row, fold,
    scores`` to ``out``; return the per-label histograms and the row count."""
    r, emb = _embeddings(uri, rows)
    if not len(r):
        return {"rows": 0, "stats": LabelStats.empty(len(vocab)), "file": None}
    f = folds[r]
    scores = np.empty((len(r), len(vocab)), np.float32)
    for h in heads:
        sel = f == h["fold"]
        if sel.any():
            logits = emb[sel].astype(np.float32) @ h["weight"].T + h["bias"]
            scores[sel] = 1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0)))
    targets = multi_hot(labels.take(pa.array(r)), vocab)
    offsets = np.arange(0, scores.size + 1, scores.shape[1], dtype=np.int32)
    table = pa.table({
        "image_id": ids.take(pa.array(r)), "row": pa.array(r, pa.int64()), "fold": pa.array(f.astype(np.int8)),
        "scores": pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores.reshape(-1))),
    })
    with storage.atomic_local_file(out, ".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd", use_byte_stream_split=["scores.list.element"],
                       use_dictionary=False)
    return {"rows": len(r), "stats": LabelStats.of(scores, targets), "file": out}


def read_scores(uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An out-of-fold part: (rows, folds, scores (n, C) float32)."""
    t = storage.read_table(uri, columns=["row", "fold", "scores"])
    s = t.column("scores").combine_chunks()
    n = t.num_rows
    values = pc.list_flatten(s).to_numpy(zero_copy_only=False)
    return (t.column("row").to_numpy(), t.column("fold").to_numpy(),
            values.reshape(n, len(values) // max(n, 1)).astype(np.float32, copy=False))


def candidate_part(uri: str, cal: Calibration, labels: pa.ListArray, vocab: list[str], floor: float, cut: float,
                   out: str) -> dict:
    """The pairs of an out-of-fold part with suspicion >= ``floor``, written to ``out``
    sorted by suspicion (highest first). Returns per-label candidate and flagged
    counts by kind and a histogram of the suspicions written."""
    rows, _, scores = read_scores(uri)
    c = len(vocab)
    targets = multi_hot(labels.take(pa.array(rows)), vocab)
    sus = cal.suspicion(scores, targets)
    r, j = np.nonzero(sus >= floor)
    s = sus[r, j]
    order = np.argsort(-s, kind="stable")
    r, j, s = r[order], j[order], s[order]
    observed = targets[r, j]
    table = pa.table({
        "row": pa.array(rows[r], pa.int64()), "label_index": pa.array(j.astype(np.int32)),
        "observed": pa.array(observed.astype(np.int8)), "score": pa.array(scores[r, j]),
        "suspicion": pa.array(s),
    })
    with storage.atomic_local_file(out, ".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=64_000)
    flagged = s >= cut
    counts = {}
    for name, obs in ((MISSING, 0), (WRONG, 1)):
        sel = observed == obs
        counts[name] = np.bincount(j[sel], minlength=c)
        counts[f"{name}_flagged"] = np.bincount(j[sel & flagged], minlength=c)
    hist = np.bincount(np.minimum((s * SUSPICION_BINS).astype(np.int64), SUSPICION_BINS - 1),
                       minlength=SUSPICION_BINS)
    return {"file": out, "rows": len(s), "counts": counts, "hist": hist}

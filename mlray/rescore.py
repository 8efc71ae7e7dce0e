"""Rescoring stored embeddings with a head: numpy and pyarrow only.

``mlray tag --from-embeddings`` runs ``score_embedding_rows`` as plain Ray tasks,
one per source part; this module imports no torch, so a fresh Ray worker starts
scoring at once instead of spending seconds importing it. The column builders
here (``rows_of``, ``score_columns``) also build the tagging job's output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlray import storage


def rows_of(matrix: np.ndarray, ok: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """A list column of ``len(ok)`` rows: the rows of ``matrix`` (one per true
    entry of ``ok``, in order) where ``ok``, null elsewhere. No Python loop."""
    width = matrix.shape[1] if matrix.ndim == 2 else 0
    lengths = np.where(ok, width, 0)
    offsets = np.zeros(len(ok) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(np.ascontiguousarray(matrix).reshape(-1), value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~ok))


def score_columns(scores: np.ndarray, policy, vocab: pa.Array, ok: np.ndarray) -> dict[str, pa.ListArray]:
    """``scores`` and ``labels`` columns of the tagging contract for the rows where
    ``ok`` (``scores`` holds those rows only); the other rows get nulls."""
    pred = policy.predict(scores) if len(scores) else np.zeros((0, len(vocab)), bool)
    rows, cols = np.nonzero(pred)  # row-major: each row's labels in vocabulary order
    counts = np.zeros(len(ok), np.int64)
    counts[np.flatnonzero(ok)] = pred.sum(axis=1)
    offsets = np.zeros(len(ok) + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    labels = pa.ListArray.from_arrays(pa.array(offsets), vocab.take(pa.array(cols, pa.int64())), mask=pa.array(~ok))
    return {"scores": rows_of(scores.astype(np.float32, copy=False), ok, pa.float32()), "labels": labels}


class EmbeddingScores:
    """Rows of a tag output with embeddings in, the tagging contract's rows of another
    head out (``mlray tag --from-embeddings``). No image is read: the head is a
    matrix product, so this is a plain task function (``score_embedding_rows``)
    that Ray Data fuses with the read and the write, and the embeddings never
    pass through the object store. Error rows pass through with their error."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, policy, vocab: Sequence[str], model_id: str, *,
                 keep_embeddings: bool = False, progress=None):
        self.weight = np.ascontiguousarray(weight, np.float32)  # (D, C)
        self.bias = np.asarray(bias, np.float32)
        self.dim = self.weight.shape[0]
        self.policy = policy
        self.vocab = list(vocab)
        self.model_id = model_id
        self.keep_embeddings = keep_embeddings
        self.progress = progress  # a mlray.progress counter actor, told the rows of each batch

    @classmethod
    def from_predictor(cls, predictor, *, threshold: float | None = None, top_k: int | None = None,
                       **kw) -> "EmbeddingScores":
        """The head of a loaded ``mlray.inference.Predictor`` (the backbone stays behind)."""
        from mlray.inference import _policy

        fc = predictor.model.get_classifier()
        return cls(fc.weight.detach().float().cpu().numpy().T, fc.bias.detach().float().cpu().numpy(),
                   _policy(predictor, threshold, top_k), predictor.vocab, predictor.art.model_id, **kw)

    def __call__(self, batch: pa.Table) -> pa.Table:
        emb = batch.column("embedding").combine_chunks()
        ok = emb.is_valid().to_numpy(zero_copy_only=False)
        feats = pc.list_flatten(emb).to_numpy(zero_copy_only=False).reshape(-1, self.dim)
        logits = feats.astype(np.float32) @ self.weight + self.bias
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0, out=logits)))
        n = batch.num_rows
        cols = {
            "image_id": batch.column("image_id"),
            "uri": batch.column("uri") if "uri" in batch.column_names else pa.nulls(n, pa.string()),
            **score_columns(scores, self.policy, pa.array(self.vocab, pa.string()), ok),
            "model": pa.array([self.model_id] * n, pa.string()),
            "error": batch.column("error"),
        }
        if self.keep_embeddings:
            cols["embedding"] = emb
        if self.progress is not None:
            self.progress.add.remote(n)
        return pa.table(cols)


def score_embedding_rows(batch: pa.Table, scorer: EmbeddingScores, new_refs: list | None = None) -> pa.Table:
    """Ray Data task: the source parts named in ``batch["uri"]`` read, filtered to the
    rows the plan found new (``new_refs``; all rows when None), and scored."""
    import pyarrow.parquet as pq

    from mlray.tag_plan import keep_new

    out = []
    for uri in batch.column("uri").to_pylist():
        fs, path = storage.resolve(uri)
        t = storage.retrying(
            lambda: pq.read_table(path, filesystem=fs, columns=["image_id", "uri", "embedding", "error"]), uri)
        if new_refs is not None:
            t = keep_new(t, new_refs)
        if t.num_rows:
            out.append(scorer(t))
    return pa.concat_tables(out) if out else scorer(_empty_source())


def _empty_source() -> pa.Table:
    return pa.table({"image_id": pa.array([], pa.string()), "uri": pa.array([], pa.string()),
                     "embedding": pa.array([], pa.list_(pa.float16())), "error": pa.array([], pa.string())})

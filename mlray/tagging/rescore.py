"""Rescoring stored embeddings with a head: numpy and pyarrow only.

``mlray tag --from-embeddings`` runs ``score_embedding_rows`` as plain Ray tasks,
one per source part; this module imports no torch, so a fresh Ray worker starts
scoring at once instead of spending seconds importing it. Rows are built by the
same ``io.tagged.score_rows`` as the image-scoring actors'.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlray.io import storage
from mlray.io.tagged import score_rows
from mlray.tagging.plan import keep_new


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
        self.vocab_array = pa.array(self.vocab, pa.string())
        self.model_id = model_id
        self.keep_embeddings = keep_embeddings
        self.progress = progress  # a mlray.progress counter actor, told the rows of each batch

    @classmethod
    def from_predictor(cls, predictor, *, threshold: float | None = None, top_k: int | None = None,
                       **kw) -> "EmbeddingScores":
        """The head of a loaded ``mlray.model.predictor.Predictor`` (the backbone stays behind)."""
        fc = predictor.model.get_classifier()
        return cls(fc.weight.detach().float().cpu().numpy().T, fc.bias.detach().float().cpu().numpy(),
                   predictor.art.policy.override(threshold=threshold, top_k=top_k), predictor.vocab,
                   predictor.art.model_id, **kw)

    def __call__(self, batch: pa.Table) -> pa.Table:
        emb = batch.column("embedding").combine_chunks()
        ok = emb.is_valid().to_numpy(zero_copy_only=False)
        feats = pc.list_flatten(emb).to_numpy(zero_copy_only=False).reshape(-1, self.dim)
        logits = feats.astype(np.float32) @ self.weight + self.bias
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0, out=logits)))
        cols = score_rows(
            batch.column("image_id"), batch.column("uri") if "uri" in batch.column_names else None,
            batch.column("error"), scores, ok, self.policy, self.vocab_array, self.model_id,
            emb if self.keep_embeddings else None,
        )
        if self.progress is not None:
            self.progress.add.remote(batch.num_rows)
        return pa.table(cols)


def score_embedding_rows(batch: pa.Table, scorer: EmbeddingScores, new_refs: list | None = None) -> pa.Table:
    """Ray Data task: the source parts named in ``batch["uri"]`` read, filtered to the
    rows the plan found new (``new_refs``; all rows when None), and scored."""
    out = []
    for uri in batch.column("uri").to_pylist():
        t = storage.read_table(uri, columns=["image_id", "uri", "embedding", "error"])
        if new_refs is not None:
            t = keep_new(t, new_refs)
        if t.num_rows:
            out.append(scorer(t))
    return pa.concat_tables(out) if out else scorer(_empty_source())


def _empty_source() -> pa.Table:
    return pa.table({"image_id": pa.array([], pa.string()), "uri": pa.array([], pa.string()),
                     "embedding": pa.array([], pa.list_(pa.float16())), "error": pa.array([], pa.string())})

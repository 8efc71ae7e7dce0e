"""Real tag OUT parts, written through the tagging-output contract (``mlray.io.tagged``)
the way ``mlray tag`` writes them, for the tests of the readers of OUT."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mlray.io.tagged import score_rows, score_schema, write_part
from mlray.model.thresholds import ThresholdPolicy

VOCAB = ["cat", "dog", "bird"]


def part(out: str, rows: list[tuple[str, str | None]], *, model: str = "run@epoch1", vocab=VOCAB,
         embedding: dict | None = None) -> str:
    """Write one part of ``(image_id, error)`` rows (error None: a scored row) into ``out``;
    with ``embedding`` (``model``, ``dim``, ``backbone_digest``) an embedding column too."""
    ids = [r[0] for r in rows]
    ok = np.array([e is None for _, e in rows])
    rng = np.random.default_rng(len(ids))
    scores = rng.random((int(ok.sum()), len(vocab))).astype(np.float32)
    emb = None
    if embedding is not None:
        values = rng.random((len(ids), embedding["dim"])).astype(np.float16)
        emb = pa.array([list(v) if k else None for v, k in zip(values, ok)], pa.list_(pa.float16()))
    cols = score_rows(pa.array(ids, pa.string()), None, pa.array([e for _, e in rows], pa.string()), scores, ok,
                      ThresholdPolicy.fixed(len(vocab)), pa.array(vocab), model, embedding=emb)
    return write_part(out, pa.table(cols, schema=score_schema(vocab, embedding)))

"""Scoring in Ray: a run's model as a Ray Data actor pool over decoded (or encoded) rows.

``score_dataset`` appends the pool to any dataset of rows with ``image_id``,
``error`` and ``image`` (decoded) or ``encoded`` (bytes, decoded in the actor next
to the model: ``device_decode``); every input row yields one row of the tagging
contract (``mlray.io.tagged``). ``score_splits`` scores splits of a manifest for
``evaluate`` and ``audit``, decoding them as the run's training did on that
hardware (``data.decode``), so the thresholds tuned there meet the same pixels.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mlray.io.tagged import rows_of, score_rows
from mlray.model.predictor import Predictor
from mlray.model.rundir import load_artifacts


MODEL_DOES_NOT_LOAD = "the model does not load in the scoring actor"
# Images per scoring call when none is asked: a GPU needs batches of hundreds to
# be busy (an actor scores one batch at a time there), a CPU scores 64 as fast as
# more, with less memory held per call.
BATCH_SIZE = {"cpu": 64, "gpu": 256}


def default_batch_size(num_gpus: float) -> int:
    """Images per scoring call for an actor with ``num_gpus`` GPUs."""
    return BATCH_SIZE["gpu" if num_gpus else "cpu"]


def scoring_actor_cpus(num_gpus: float, actor_cpus: float | None = None) -> float:
    """CPUs a scoring actor asks Ray for: ``actor_cpus`` when given, else 1 beside a
    GPU (it feeds the GPU) and 0.5 on CPU (decode tasks keep the rest)."""
    return actor_cpus if actor_cpus is not None else (1.0 if num_gpus else 0.5)


class ScoreBatches:
    """Ray Data actor: decoded batches in, the tagging contract's rows out.

    Rows that failed upstream keep their ``error`` and get null ``scores`` and
    ``labels``; every input row yields exactly one output row.
    """

    def __init__(
        self, directory: str, *, threshold: float | None = None, top_k: int | None = None,
        with_targets: bool = False, torch_threads: int | None = None, progress=None, embeddings: bool = False,
        decode_threads: int = 2, precision: str = "auto",
    ):
        self.torch_threads = torch_threads
        self.decoder = None  # made at the first batch of encoded bytes
        self.lock = threading.Lock()
        self.decode_threads = decode_threads
        self.progress = progress  # a mlray.progress counter actor, told the rows of each batch
        self.embeddings = embeddings
        try:
            self.predictor = Predictor.load(directory, precision=precision)
        except (OSError, RuntimeError, ValueError, KeyError) as e:  # e.g. weights that do not fit config.yaml
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"{MODEL_DOES_NOT_LOAD}: {first}") from None
        self.policy = self.predictor.art.policy.override(threshold=threshold, top_k=top_k)
        self.model_id = self.predictor.art.model_id
        self.with_targets = with_targets
        self.vocab_array = pa.array(self.predictor.vocab, pa.string())

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        if self.torch_threads and torch.get_num_threads() != self.torch_threads:
            # Ray Data calls this from its own threads, whose OpenMP team size comes
            # from OMP_NUM_THREADS (1 for fractional-CPU actors), not from __init__.
            torch.set_num_threads(self.torch_threads)
        if "encoded" in batch:  # --decode device: the bytes are decoded here, next to the model
            with self.lock:  # batches may run in several threads at once (CPU scoring)
                if self.decoder is None:
                    from mlray.model.device_decode import Decoder

                    self.decoder = Decoder(self.predictor.size, self.predictor.device, threads=self.decode_threads)
            images, errs = self.decoder(list(batch["encoded"]), list(batch["error"]))
            errors = np.array(errs, dtype=object)
        else:
            images, errors = batch["image"], batch["error"]
        ok = np.array([e == "" for e in errors], dtype=bool)
        n = len(errors)
        if self.predictor.device.type == "cuda" or ok.all():
            # every row, one shape: no boolean mask on the device (a sync), no new
            # shape for cuDNN to time; the failed rows' scores are dropped on the host
            scores, feats = self.predictor.scores_and_embeddings(images, embeddings=self.embeddings)
            if not ok.all():
                scores, feats = scores[ok], (feats[ok] if feats is not None else None)
        else:  # on a CPU a row not scored is time saved
            scores, feats = self.predictor.scores_and_embeddings(images[torch.from_numpy(ok)]
                                                                 if torch.is_tensor(images) else images[ok],
                                                                 embeddings=self.embeddings)
        uris = pa.array([u or None for u in batch["uri"].tolist()], pa.string()) if "uri" in batch else None
        cols = score_rows(
            pa.array(batch["image_id"].tolist(), pa.string()), uris,
            pa.array([None if e == "" else e for e in errors], pa.string()), scores, ok, self.policy,
            self.vocab_array, self.model_id, rows_of(feats, ok, pa.float16()) if self.embeddings else None,
        )
        for k, v in batch.items():  # other id-like columns pass through (e.g. split)
            if k not in cols and k not in ("image", "target", "encoded") and v.dtype == object:
                cols[k] = pa.array([x or None for x in v.tolist()], pa.string())
        if self.with_targets:
            cols["target"] = pa.array(list(batch["target"]), pa.list_(pa.uint8()))
        if self.progress is not None:
            self.progress.add.remote(n)
        return pa.table(cols)


MAX_CPU_CALLS = 4  # batches a CPU scoring actor scores at once


def score_dataset(
    ds, directory: str, *, batch_size: int | None = None, concurrency: int = 1, num_gpus: float = 0.0,
    actor_cpus: float | None = None, threshold: float | None = None, top_k: int | None = None,
    with_targets: bool = False, progress=None, embeddings: bool = False, precision: str = "auto",
):
    """Append the actor pool that scores rows: decoded (``image``) or encoded
    (``encoded``: decoded in the actor), with ``error`` and ids; ``progress`` (a
    ``mlray.progress.counter``) is told the rows of every batch. ``batch_size``
    None: ``default_batch_size(num_gpus)``."""
    from ray.data import ActorPoolStrategy

    from mlray.runtime import worker_runtime_env

    cpus = scoring_actor_cpus(num_gpus, actor_cpus)
    # On CPU an actor scores several batches at once, each on its share of the
    # cores, rather than one batch on all of them: fewer threads meeting at an
    # OpenMP barrier every layer, and one batch's Python work (arrays, Arrow
    # columns) overlaps another's model (about 1.25x the images/s on 2 cores, for
    # about 30% more actor memory). At most MAX_CPU_CALLS batches, as each holds
    # its activations. A GPU actor scores one batch at a time.
    cores = max(1, int(os.cpu_count() or 1) // max(1, concurrency))
    calls = 1 if num_gpus else min(cores, MAX_CPU_CALLS)
    threads = None if num_gpus else max(1, cores // calls)
    return ds.map_batches(
        ScoreBatches,
        fn_constructor_args=(directory,),
        fn_constructor_kwargs={
            "threshold": threshold, "top_k": top_k, "with_targets": with_targets, "torch_threads": threads,
            "progress": progress, "embeddings": embeddings,
            "decode_threads": 4 if num_gpus else max(1, int(os.cpu_count() or 1)), "precision": precision,
        },
        batch_size=batch_size or default_batch_size(num_gpus),
        batch_format="numpy",
        compute=ActorPoolStrategy(size=concurrency, max_concurrent_calls_per_actor=calls,
                                   enable_true_multi_threading=calls > 1),
        num_gpus=num_gpus or None,
        num_cpus=cpus,
        runtime_env=worker_runtime_env(),
    )


@dataclass
class Scored:
    ids: list[str]
    scores: np.ndarray
    targets: np.ndarray
    errors: list[tuple[str, str]]


def score_splits(run: str, manifest: str, splits: Sequence[str], *, batch_size: int | None = None,
                 concurrency: int = 1, num_gpus: float = 0.0, precision: str = "auto") -> dict[str, Scored]:
    """Score some splits of a manifest with the run's model, in one Ray Data
    pipeline (one model actor pool, however many splits), in ``precision``
    (``factory.scoring_dtype``). Images are decoded where the run's training
    decoded them on the same hardware (``data.decode``, resolved for ``num_gpus``):
    by CPU tasks, or next to the model (nvJPEG on a GPU)."""
    from mlray.data.pipeline import image_dataset
    from mlray.io.manifest import read_vocab
    from mlray.model.device_decode import resolve_mode
    from mlray.runtime import init_ray

    art = load_artifacts(run)
    vocab = read_vocab(manifest)
    if vocab != art.vocab:
        raise ValueError(
            f"{manifest}: its vocabulary ({len(vocab)} labels) differs from the run's ({len(art.vocab)}); "
            "use a manifest prepared with the same labels"
        )
    init_ray()
    ds = image_dataset(manifest, list(splits), size=art.config.data.image_size, vocab=vocab,
                       keep=("image_id", "uri", "split"),
                       decode=resolve_mode(art.config.data.decode, num_gpus, "train"))
    ds = score_dataset(ds, run, batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus, with_targets=True,
                       precision=precision)
    rows: dict[str, dict[str, list]] = {s: {"ids": [], "scores": [], "targets": [], "errors": []} for s in splits}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            r = rows[row["split"]]
            if row["error"] is not None:
                r["errors"].append((row["image_id"], row["error"]))
                continue
            r["ids"].append(row["image_id"])
            r["scores"].append(row["scores"])
            r["targets"].append(row["target"])
    out = {}
    for s, r in rows.items():
        if not r["ids"]:
            raise ValueError(f"{manifest}: no decodable images in split {s!r}")
        out[s] = Scored(r["ids"], np.asarray(r["scores"], np.float32), np.asarray(r["targets"], np.uint8), r["errors"])
    return out

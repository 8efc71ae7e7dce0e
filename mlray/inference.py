"""A trained model ready to score images, alone or as a Ray Data actor pool.

Used by ``evaluate``, ``predict`` and ``tag`` alike, so all three score exactly
the same way: the run directory's weights (BatchNorm folded into the
convolutions, checked against the model as trained; ``models.fused_model``),
the training image size and normalisation, and the same mixed precision as
training on that GPU (bf16 where it is native, else fp16; ``models.amp_dtype``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
from collections.abc import Sequence

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from mlray import rundir
from mlray.manifest import EMBEDDING_KEY
from mlray.rescore import rows_of, score_columns
from mlray.rundir import RunArtifacts, load_artifacts

# torch is imported inside: the tagging driver imports this module for the actor
# class and the output schema, and importing torch there cost ~2 s of start-up.
if TYPE_CHECKING:
    import torch


# On a CPU, in fp32, a batch is scored CPU_CHUNK images at a time: the same images/s
# as the whole batch at once (EfficientNet-Lite0, 128 px, one thread: 199.5 img/s at
# 64, 199.7 at 16, 4 interleaved repeats; 6,000-file tag jobs: a tie over 7 pairs),
# with a quarter of the activations alive (the largest layer output alone is 96 MB
# at 64 images). bf16 on a CPU is faster whole (309 against 327 img/s on the model
# alone; tag jobs 8-10% longer in chunks, 2 pairs), and a GPU takes the whole batch.
CPU_CHUNK = 16


class Predictor:
    """The model of a run directory (or checkpoint folder), on one device."""

    def __init__(self, art: RunArtifacts, device: str | torch.device | None = None, fuse: bool = True,
                 precision: str = "auto"):
        """``fuse``: fold BatchNorm into the convolutions before it (``models.fused_model``);
        ``precision``: ``auto``, ``fp32`` or ``bf16`` (``models.scoring_dtype``)."""
        import torch

        from mlray.models import create_model, fused_model, normalization, scoring_dtype

        self.art = art
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cfg = art.config
        model = create_model(cfg.model.model_copy(update={"pretrained": "none"}), len(art.vocab))
        model.load_state_dict(rundir.load_weights(rundir.scoring_weights(art.directory)))
        model = model.to(self.device).eval()
        head = {id(p) for p in model.get_classifier().parameters()}
        # the backbone's weights as trained (names and dtypes), for backbone_digest: folding changes them
        self._backbone_keys = [(k, v.dtype) for k, v in model.state_dict(keep_vars=True).items() if id(v) not in head]
        self.fused = 0
        if fuse:
            model, self.fused = fused_model(model, cfg.data.image_size)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.mean, self.std = normalization(model)
        self.size = cfg.data.image_size
        self.dtype = scoring_dtype(precision, cfg.optim.amp, self.device)  # fp16 needs no loss scaling to score

    def autocast(self):
        """The scoring precision's context: autocast in ``self.dtype``, or nothing (fp32)."""
        import torch

        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    @classmethod
    def load(cls, directory: str, device: str | torch.device | None = None, fuse: bool = True,
             precision: str = "auto") -> "Predictor":
        return cls(load_artifacts(directory), device, fuse, precision)

    @property
    def vocab(self) -> list[str]:
        return self.art.vocab

    def scores(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (N, size, size, 3) -> sigmoid scores (N, C) float32."""
        return self.scores_and_embeddings(images, embeddings=False)[0]

    def scores_and_embeddings(self, images: np.ndarray | torch.Tensor, embeddings: bool = True):
        """uint8 (N, size, size, 3) -> (sigmoid scores (N, C) float32, the pooled
        features that feed the head (N, D) float16, or None)."""
        import torch

        if len(images) == 0:
            return np.zeros((0, len(self.vocab)), np.float32), (np.zeros((0, self.embedding_dim), np.float16) if embeddings else None)
        t = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images  # a writable copy
        step = CPU_CHUNK if self.device.type == "cpu" and self.dtype is None else len(t)
        parts = [self._forward(t[i : i + step], embeddings) for i in range(0, len(t), step)]
        scores = np.concatenate([s for s, _ in parts])
        return scores, (np.concatenate([f for _, f in parts]) if embeddings else None)

    def _forward(self, images: torch.Tensor, embeddings: bool):
        import torch

        from mlray.augment import preprocess

        with torch.inference_mode(), self.autocast():
            x = preprocess(images, self.device, self.mean, self.std)
            if embeddings:
                pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
                logits = self.model.get_classifier()(pooled)
            else:
                logits = self.model(x)
            scores = torch.sigmoid(logits.float()).cpu().numpy()
            return scores, (pooled.float().cpu().numpy().astype(np.float16) if embeddings else None)

    @property
    def embedding_dim(self) -> int:
        return int(self.model.num_features)

    @functools.cached_property
    def backbone_digest(self) -> str:
        """sha256 (16 hex) of every weight but the head's, as trained (read from the
        run's weights file, not from the folded model): equal digests, equal embeddings."""
        weights = rundir.load_weights(rundir.scoring_weights(self.art.directory))
        h = hashlib.sha256()
        for name, dtype in self._backbone_keys:
            h.update(name.encode())
            h.update(weights[name].to(dtype).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


SCORE_SCHEMA_FIELDS = [
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("scores", pa.list_(pa.float32())),
    ("labels", pa.list_(pa.string())),
    ("model", pa.string()),
    ("error", pa.string()),
]



def score_schema(vocab: Sequence[str], embedding: dict | None = None) -> pa.Schema:
    """The tagging output's schema; with ``embedding`` (``model``, ``dim``,
    ``backbone_digest``) an ``embedding`` column (list<float16>) and that
    description in the schema metadata."""
    from mlray.manifest import schema_with_vocab

    schema = schema_with_vocab(pa.schema(SCORE_SCHEMA_FIELDS), vocab)
    if embedding is None:
        return schema
    meta = dict(schema.metadata or {})
    meta[EMBEDDING_KEY] = json.dumps(embedding).encode()
    return schema.append(pa.field("embedding", pa.list_(pa.float16()))).with_metadata(meta)


def _policy(predictor: Predictor, threshold: float | None, top_k: int | None):
    """The run's tuned thresholds, or ``--top-k`` / ``--threshold`` instead."""
    if top_k is not None:
        from dataclasses import replace

        return replace(predictor.art.policy, strategy="top_k", top_k=top_k)
    if threshold is not None:
        from mlray.thresholds import ThresholdPolicy

        return ThresholdPolicy.fixed(len(predictor.vocab), threshold, at_least_one=False)
    return predictor.art.policy


MODEL_DOES_NOT_LOAD = "the model does not load in the scoring actor"


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
        self.policy = _policy(self.predictor, threshold, top_k)
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
                    from mlray.device_decode import Decoder

                    self.decoder = Decoder(self.predictor.size, self.predictor.device, threads=self.decode_threads)
            images, errs = self.decoder(list(batch["encoded"]), list(batch["error"]))
            errors = np.array(errs, dtype=object)
            ok = np.array([e == "" for e in errors], dtype=bool)
            images = images[torch.from_numpy(ok).to(images.device)]
        else:
            errors = batch["error"]
            ok = np.array([e == "" for e in errors], dtype=bool)
            images = batch["image"][ok]
        n = len(errors)
        scores, feats = self.predictor.scores_and_embeddings(images, embeddings=self.embeddings)
        cols = {
            "image_id": pa.array(batch["image_id"].tolist(), pa.string()),
            "uri": pa.array([u or None for u in batch["uri"].tolist()], pa.string()) if "uri" in batch else pa.nulls(n, pa.string()),
            **score_columns(scores, self.policy, self.vocab_array, ok),
            "model": pa.array([self.model_id] * n, pa.string()),
            "error": pa.array([None if e == "" else e for e in errors], pa.string()),
        }
        for k, v in batch.items():  # other id-like columns pass through (e.g. split)
            if k not in cols and k not in ("image", "target", "encoded") and v.dtype == object:
                cols[k] = pa.array([x or None for x in v.tolist()], pa.string())
        if self.embeddings:
            cols["embedding"] = rows_of(feats, ok, pa.float16())
        if self.with_targets:
            cols["target"] = pa.array(list(batch["target"]), pa.list_(pa.uint8()))
        if self.progress is not None:
            self.progress.add.remote(n)
        return pa.table(cols)


MAX_CPU_CALLS = 4  # batches a CPU scoring actor scores at once


def score_dataset(
    ds, directory: str, *, batch_size: int = 64, concurrency: int = 1, num_gpus: float = 0.0,
    actor_cpus: float | None = None, threshold: float | None = None, top_k: int | None = None,
    with_targets: bool = False, progress=None, embeddings: bool = False, precision: str = "auto",
):
    """Append the actor pool that scores rows: decoded (``image``) or encoded
    (``encoded``: decoded in the actor), with ``error`` and ids; ``progress`` (a
    ``mlray.progress.counter``) is told the rows of every batch."""
    from ray.data import ActorPoolStrategy

    from mlray.runtime import worker_runtime_env

    cpus = actor_cpus if actor_cpus is not None else (1.0 if num_gpus else 0.5)
    # On CPU an actor scores several batches at once, each on its share of the
    # cores, rather than one batch on all of them: fewer threads meeting at an
    # OpenMP barrier every layer, and one batch's Python work (arrays, Arrow
    # columns) overlaps another's model. EfficientNet-Lite0 at 128 px on 2 cores
    # (2 batches x 1 thread), tagging 6,000 files: 175-178 -> 220-228 images/s
    # after the first batch (2 rounds, interleaved); the actor's memory grew from
    # 1.40 to 1.85 GB (USS). At most MAX_CPU_CALLS batches, as each holds its
    # activations. A GPU actor scores one batch at a time.
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
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=concurrency, max_concurrent_calls_per_actor=calls,
                                   enable_true_multi_threading=calls > 1),
        num_gpus=num_gpus or None,
        num_cpus=cpus,
        runtime_env=worker_runtime_env(),
    )

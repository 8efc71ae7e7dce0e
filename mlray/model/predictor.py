"""A trained model ready to score images: ``Predictor``.

Used by ``evaluate``, ``predict``, ``tag``, ``head`` and ``audit`` alike (through
``mlray.model.scoring`` when the scoring runs in Ray), so all of them score
exactly the same way: the run directory's weights (BatchNorm folded into the
convolutions, checked against the model as trained; ``factory.fused_model``),
the training image size and normalisation, and the same mixed precision as
training on that GPU (bf16 where it is native, else fp16; ``factory.amp_dtype``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from typing import TYPE_CHECKING

import numpy as np

from mlray.model import rundir
from mlray.model.rundir import RunArtifacts, load_artifacts

# torch is imported inside: drivers that only check a run directory import this
# module's neighbours without paying torch's start-up.
if TYPE_CHECKING:
    import torch


# On a CPU, in fp32, a batch is scored CPU_CHUNK images at a time: the same images/s
# as the whole batch at once, with a quarter of the activations alive (the largest
# layer output of EfficientNet-Lite0 alone is 96 MB at 64 images). bf16 on a CPU is
# faster whole, and a GPU takes the whole batch.
CPU_CHUNK = 16


class Predictor:
    """The model of a run directory (or checkpoint folder), on one device."""

    def __init__(self, art: RunArtifacts, device: str | torch.device | None = None, fuse: bool = True,
                 precision: str = "auto"):
        """``fuse``: fold BatchNorm into the convolutions before it (``factory.fused_model``);
        ``precision``: ``auto``, ``fp32`` or ``bf16`` (``factory.scoring_dtype``)."""
        import torch

        from mlray.model.factory import create_model, fused_model, normalization, scoring_dtype

        self.art = art
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            # scoring batches have one size (the last of a job aside): cuDNN times its
            # convolution algorithms once per shape and keeps the fastest
            torch.backends.cudnn.benchmark = True
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

        from mlray.model.augment import preprocess

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

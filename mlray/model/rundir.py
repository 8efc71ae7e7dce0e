"""The run directory: everything needed to use a trained model, nothing else.

``storage_path/<run name>/`` (local or s3://) holds, next to Ray Train's own
``checkpoint_*`` folders:

    config.yaml        the resolved config of the run
    labels.json        the vocabulary (multi-hot order) and training label counts
    model.safetensors  the best weights by validation mAP
    thresholds.json    the thresholds tuned on validation for those weights
    best.json          which epoch, and its validation metrics
    val_profile.json   what the best model predicts on validation: the reference
                       ``mlray tag`` measures drift against (written with best.json)
    history.jsonl      one JSON line of metrics per epoch
    report/            written by ``mlray evaluate``

A Ray Train checkpoint folder holds the same first four files (plus optimizer
state), so ``load_artifacts`` accepts either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mlray.io import storage
from mlray.config import Config, build_config
from mlray.model.thresholds import ThresholdPolicy

if TYPE_CHECKING:  # torch is imported where weights are read or written: checking a run needs none of it
    import torch

CONFIG, LABELS, WEIGHTS, THRESHOLDS, BEST, HISTORY = (
    "config.yaml", "labels.json", "model.safetensors", "thresholds.json", "best.json", "history.jsonl",
)
PROFILE = "val_profile.json"
EMA_FILE = "ema.safetensors"  # checkpoints of runs with optim.ema_decay: the weights to score with


def run_dir(cfg: Config) -> str:
    return storage.join(cfg.run.storage_path, cfg.run.name)


def weights_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})


def save_weights(uri: str, state_dict: dict[str, torch.Tensor]) -> None:
    storage.write_bytes(uri, weights_bytes(state_dict))


def load_weights(uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(storage.read_bytes(uri))


def scoring_weights(directory: str) -> str:
    """The weights a run scores with: its EMA weights when it kept them, else the best."""
    ema = storage.join(directory, EMA_FILE)
    return ema if storage.exists(ema) else storage.join(directory, WEIGHTS)


def weight_shapes(uri: str) -> dict[str, list[int]]:
    """Tensor names and shapes of a safetensors file, from its header alone: no
    torch, no tensor data read. Raises ValueError when the header is unreadable or
    the file is shorter or longer than the header says (a truncated upload)."""
    fs, path = storage.resolve(uri)

    def read_header() -> tuple[int, bytes]:
        with fs.open_input_file(path) as f:
            size = f.size()
            n = int.from_bytes(f.read(8), "little")
            return size, f.read(n) if 0 < n <= size - 8 else b""

    size, raw = storage.retrying(read_header, uri)
    try:
        header = json.loads(raw)
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{uri}: not a safetensors weights file (unreadable header)") from e
    if 8 + len(raw) + end != size:
        raise ValueError(f"{uri}: {size} bytes, but its header describes {8 + len(raw) + end}; the file is "
                         "truncated or corrupt (copy it again from where the run wrote it)")
    return {k: list(v["shape"]) for k, v in tensors.items()}


def labels_doc(vocab: list[str], positives: list[int], n_train: int) -> str:
    return json.dumps({"labels": vocab, "train_positives": positives, "n_train": n_train}, indent=1)


def write_run_files(directory: str, cfg: Config, vocab: list[str], positives: list[int], n_train: int) -> None:
    storage.write_text(storage.join(directory, CONFIG), cfg.to_yaml())
    storage.write_text(storage.join(directory, LABELS), labels_doc(vocab, positives, n_train))


def write_best(directory: str, state_dict: dict[str, torch.Tensor], policy: ThresholdPolicy, epoch: int,
               val: dict, record: dict, *, val_scores: np.ndarray) -> None:
    """A new best model: its weights, the thresholds tuned for them, its validation
    profile (``val_profile``, from ``val_scores`` (N, C)) and ``best.json`` (which
    epoch, its val metrics at those thresholds, its history record), written last."""
    save_weights(storage.join(directory, WEIGHTS), state_dict)
    storage.write_text(storage.join(directory, THRESHOLDS), policy.to_json())
    storage.write_text(storage.join(directory, PROFILE), json.dumps(val_profile(val_scores, policy, epoch), indent=1))
    storage.write_text(storage.join(directory, BEST),
                       json.dumps({"epoch": epoch, "val": dict(val), "record": record}, indent=1))


def val_profile(scores: np.ndarray, policy: ThresholdPolicy, epoch: int) -> dict:
    """What a model predicts on the validation split at its tuned thresholds: images
    predicted positive per label (in ``labels.json`` order) and the mean and std of
    each image's highest score. ``mlray tag`` compares its own run with it (drift)."""
    scores = np.asarray(scores, np.float32)
    n = len(scores)
    positives = policy.predict(scores).sum(axis=0) if n else np.zeros(len(policy.thresholds), np.int64)
    top = scores.max(axis=1) if n and scores.shape[1] else np.zeros(0, np.float32)
    return {
        "epoch": epoch, "images": n, "predicted_positives": [int(v) for v in positives],
        "top_score_mean": float(top.mean()) if len(top) else None,
        "top_score_std": float(top.std()) if len(top) else None,
    }


def read_val_profile(directory: str, n_labels: int) -> dict | None:
    """``val_profile.json`` of a run, or None when the run has none (made before
    profiles were written, or a checkpoint folder). Raises ValueError naming the
    file when it is unreadable or does not describe ``n_labels`` labels."""
    uri = storage.join(directory, PROFILE)
    if not storage.exists(uri):
        return None
    try:
        doc = json.loads(storage.read_text(uri))
        counts = doc["predicted_positives"]
        int(doc["images"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{uri}: not a validation profile ({e}); train the run again or delete the file "
                         "(tagging then checks no drift)") from e
    if len(counts) != n_labels:
        raise ValueError(f"{uri}: {len(counts)} labels, but {LABELS} has {n_labels}; the two files come from "
                         "different runs")
    return doc


def read_best(directory: str) -> dict:
    """``best.json`` of a run ({} before its first epoch ended)."""
    uri = storage.join(directory, BEST)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else {}


def write_history(directory: str, history: list[dict]) -> None:
    storage.write_text(storage.join(directory, HISTORY), "".join(json.dumps(h) + "\n" for h in history))


def read_history(directory: str) -> list[dict]:
    uri = storage.join(directory, HISTORY)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


@dataclass
class RunArtifacts:
    directory: str
    config: Config
    vocab: list[str]
    train_positives: list[int]
    n_train: int
    policy: ThresholdPolicy
    best: dict

    @property
    def prior(self) -> list[float]:
        return [p / max(self.n_train, 1) for p in self.train_positives]

    @property
    def model_id(self) -> str:
        epoch = self.best.get("epoch")
        return f"{self.config.run.name}@epoch{epoch}" if epoch is not None else self.config.run.name


def load_artifacts(directory: str) -> RunArtifacts:
    """Read a run directory (or a checkpoint folder); errors say which file is missing."""
    for name in (CONFIG, LABELS, WEIGHTS):
        if not storage.exists(storage.join(directory, name)):
            raise FileNotFoundError(
                f"{directory}: no {name}; pass a run directory (storage_path/run name) or a checkpoint folder "
                "of a run that finished at least one epoch"
            )
    import yaml

    cfg = build_config(yaml.safe_load(storage.read_text(storage.join(directory, CONFIG))), source=directory)
    labels = json.loads(storage.read_text(storage.join(directory, LABELS)))
    th_uri = storage.join(directory, THRESHOLDS)
    vocab = labels["labels"]
    policy = (
        ThresholdPolicy.from_json(storage.read_text(th_uri)) if storage.exists(th_uri) else ThresholdPolicy.fixed(len(vocab))
    )
    return RunArtifacts(directory, cfg, vocab, labels["train_positives"], labels["n_train"], policy, read_best(directory))

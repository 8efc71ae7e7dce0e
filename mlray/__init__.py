"""mlray: multi-label image classifiers at cluster scale on Ray.

The jobs, as Python functions (each also a command: ``mlray --help``)::

    from mlray import prepare, train, evaluate, tag, train_head, audit, Predictor, load_config

    prepare("labels.csv", "s3://bucket/images", "s3://bucket/manifest", pack=True)
    result = train(load_config("jobs/configs/demo.yaml", ["optim.epochs=3"]))
    evaluate(result.run_dir, "s3://bucket/manifest", "test")
    tag(result.run_dir, "s3://bucket/new/", "s3://bucket/tags/")
    audit("s3://bucket/manifest", result.run_dir, "s3://bucket/audit/")  # suspects, report, fixes.csv
    Predictor.load(result.run_dir).scores(images)  # uint8 (N, H, W, 3) -> (N, C)

Importing ``mlray`` is light: each name is imported on first use (torch, timm
and Ray only then).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "prepare": "mlray.data.prepare",
    "train": "mlray.training.trainer",
    "evaluate": "mlray.evaluation.report",
    "tag": "mlray.tagging.job",
    "TagOptions": "mlray.tagging.job",
    "train_head": "mlray.training.head",
    "HeadOptions": "mlray.training.head",
    "audit": "mlray.audit.job",
    "AuditOptions": "mlray.audit.job",
    "Predictor": "mlray.model.predictor",
    "load_config": "mlray.config",
    "Config": "mlray.config",
}

__all__ = sorted(_API)

if TYPE_CHECKING:
    from mlray.audit.job import AuditOptions, audit
    from mlray.config import Config, load_config
    from mlray.data.prepare import prepare
    from mlray.evaluation.report import evaluate
    from mlray.model.predictor import Predictor
    from mlray.tagging.job import TagOptions, tag
    from mlray.training.head import HeadOptions, train_head
    from mlray.training.trainer import train


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])

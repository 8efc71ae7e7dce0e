"""Training configs the tests share."""

from __future__ import annotations

from mlray.config import Config, build_config


def small_run_config(manifest: str, storage_path: str, name: str, **over) -> Config:
    """A training config small enough for this machine: 64 px, two 0.5-CPU workers,
    two epochs (the first with the backbone frozen); ``over`` as dotted overrides."""
    tree = {
        "data": {"manifest": manifest, "image_size": 64, "batch_size": 16, "decode_batch_size": 64},
        "model": {"name": "tf_efficientnet_lite0", "pretrained": "efficientnet-lite0"},
        "optim": {"epochs": 2, "lr": 2e-3, "freeze_epochs": 1, "warmup_epochs": 0.2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"storage_path": storage_path, "name": name, "max_failures": 2},
    }
    return build_config(tree, [f"{k}={v}" for k, v in over.items()])

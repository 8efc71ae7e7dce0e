"""Quality: mlray's default recipe against two plain-PyTorch baselines on the same data.

    python -m benchmarks.quality [--seeds 0 1] [--epochs 5] [--size 160]

Data: COCO-like scenes of 13 clip-art object classes (1-4 per scene) composed
from Debian's openclipart-png (``apt-get install openclipart-png``), byte-identical
PNGs removed first; test scenes use only held-out clip art. All three recipes
start from the same EfficientNet-Lite0 ImageNet weights and see the same images
for the same number of epochs:

* seed: the recipe from the seed questions: backbone frozen, flatten + dense
  sigmoid head, Adam lr 0.01, threshold 0.5;
* competent: a hand-written fine-tune: global-pool head, one head-only epoch then
  the full network with AdamW and cosine, light augmentation, threshold 0.5;
* mlray: ``mlray train`` with the default config, then ``mlray evaluate`` at the
  thresholds it ships.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import OUT, fmt_table, load_split, record

N_TRAIN, N_TEST = 2000, 500


def scenes_manifest(seed: int = 0) -> str:
    from mlray.datasets import openclipart_scenes
    from mlray.prepare import prepare

    root = os.path.join(OUT, "scenes")
    manifest = os.path.join(root, "manifest")
    if not os.path.exists(os.path.join(manifest, "_stats.json")):
        csv_path = openclipart_scenes(root, N_TRAIN, N_TEST, size=256, seed=seed)
        prepare(csv_path, root, manifest, split="train=0.9,val=0.1", pack=True)
    return manifest


def _backbone():
    from mlray.config import ModelConfig
    from mlray.models import create_model

    return create_model(ModelConfig(), num_classes=0)  # pooled 1280-d features


def _batches(n, bs, rng):
    order = rng.permutation(n)
    for i in range(0, n - bs + 1, bs):
        yield order[i : i + bs]


def _to_input(x_uint8, augment: bool, rng: torch.Generator | None = None):
    from mlray.augment import color_jitter, normalize, random_resized_crop_flip, to_float
    from mlray.config import AugmentConfig

    x = to_float(torch.from_numpy(x_uint8), torch.device("cpu"))
    if augment:  # "light": flips and mild crops
        x = random_resized_crop_flip(x, AugmentConfig(scale_min=0.8, color_jitter=0.0))
    return normalize(x, (0.5,) * 3, (0.5,) * 3).contiguous(memory_format=torch.channels_last)


def _scores(model, images, bs=64):
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), bs):
            out.append(torch.sigmoid(model(_to_input(images[i : i + bs], False))).numpy())
    return np.concatenate(out)


def seed_recipe(train, test, epochs, seed, bs=32):
    """Frozen backbone, flatten + dense sigmoid head, Adam lr 0.01."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    (xtr, ytr), (xte, _) = train, test
    back = _backbone().eval()
    for p in back.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        feat = back.forward_features(_to_input(xtr[:2], False))
    head = torch.nn.Linear(feat[0].numel(), ytr.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(epochs):
        for idx in _batches(len(xtr), bs, rng):
            with torch.no_grad():
                f = back.forward_features(_to_input(xtr[idx], False)).flatten(1)
            loss = F.binary_cross_entropy_with_logits(head(f), torch.from_numpy(ytr[idx]).float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return _scores(_FlattenHead(back, head), xte), 0.5


class _FlattenHead(torch.nn.Module):
    def __init__(self, back, head):
        super().__init__()
        self.back, self.head = back, head

    def forward(self, x):
        return self.head(self.back.forward_features(x).flatten(1))


def competent_recipe(train, test, epochs, seed, bs=32):
    """Global-pool head; one head-only epoch, then all layers, AdamW + cosine, light aug."""
    from mlray.config import ModelConfig
    from mlray.models import create_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    (xtr, ytr), (xte, _) = train, test
    model = create_model(ModelConfig(), ytr.shape[1]).to(memory_format=torch.channels_last)
    head = model.get_classifier()
    steps = epochs * (len(xtr) // bs)
    step = 0
    for epoch in range(epochs):
        full = epoch >= 1
        for p in model.parameters():
            p.requires_grad_(full)
        for p in head.parameters():
            p.requires_grad_(True)
        if epoch <= 1:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
        model.train()
        for idx in _batches(len(xtr), bs, rng):
            for g in opt.param_groups:
                g["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.binary_cross_entropy_with_logits(
                model(_to_input(xtr[idx], True)), torch.from_numpy(ytr[idx]).float()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return _scores(model, xte), 0.5


def mlray_recipe(manifest, epochs, seed, size, name, overrides=()):
    from mlray.config import build_config
    from mlray.report import evaluate
    from mlray.train import train

    cfg = build_config(
        {"data": {"manifest": manifest, "image_size": size}, "optim": {"epochs": epochs, "seed": seed},
         "scaling": {"num_workers": 1, "cpus_per_worker": 1},
         "run": {"storage_path": os.path.join(OUT, "runs"), "name": name}},
        list(overrides),
    )
    result = train(cfg)
    return evaluate(result.run_dir, manifest, "test", compare_strategies=True)


def main(argv=None) -> None:
    from mlray.metrics import multilabel_metrics

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--only", nargs="*", default=["seed", "competent", "mlray"])
    ap.add_argument("--override", nargs="*", default=[], help="extra mlray config overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    manifest = scenes_manifest()
    xtr, ytr, vocab = load_split(manifest, "train", args.size)
    xva, yva, _ = load_split(manifest, "val", args.size)
    xte, yte, _ = load_split(manifest, "test", args.size)
    prior = ytr.mean(axis=0)
    # The baselines train on train+val: they tune nothing on validation.
    train = (np.concatenate([xtr, xva]), np.concatenate([ytr, yva]))
    test = (xte, yte)
    rows = []
    stamp = time.strftime("%H%M%S")
    for seed in args.seeds:
        for recipe in args.only:
            t = time.time()
            if recipe == "mlray":
                doc = mlray_recipe(manifest, args.epochs, seed, args.size, f"quality-{stamp}-s{seed}", args.override)
                m = doc["metrics"]
            else:
                fn = seed_recipe if recipe == "seed" else competent_recipe
                scores, th = fn(train, test, args.epochs, seed)
                m = multilabel_metrics(scores, yte, th, prior=prior)
            rows.append({
                "recipe": recipe, "seed": seed, "test_mAP": m["mAP"], "f1_micro": m["f1_micro"],
                "f1_macro": m["f1_macro"], "no_label": m["images_without_prediction"], "minutes": (time.time() - t) / 60,
            })
            print(rows[-1], flush=True)
    summary = []
    for recipe in args.only:
        rs = [r for r in rows if r["recipe"] == recipe]
        for key in ("test_mAP", "f1_micro", "f1_macro", "no_label"):
            vals = [r[key] for r in rs]
            summary.append([recipe, key, float(np.mean(vals)), float(np.max(vals) - np.min(vals)), len(vals)])
    record("quality", rows)
    print(f"\nquality on {N_TEST} test scenes, {args.size}px, {args.epochs} epochs, seeds {args.seeds}")
    print(fmt_table(["recipe", "metric", "mean", "spread (max-min)", "runs"], summary))


if __name__ == "__main__":
    main()

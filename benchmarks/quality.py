"""Quality: mlray's default recipe against three plain-PyTorch baselines, on two
real data sets, each in two row orders.

    python -m benchmarks.quality [--seeds 0 1] [--epochs 5] [--size 160] [--sets scenes keywords]

Data (``apt-get install openclipart-png openclipart-svg``), byte-identical PNGs removed:

* scenes: COCO-like scenes of 13 clip-art object classes (1-4 per scene); test
  scenes use only held-out clip art. 1,800 train, 200 val, 500 test.
* keywords: 2,865 single clip-art images labelled with their authors' keywords,
  101 labels at 2.0% density (long tail: 15 to 486 images a label), split
  70/10/20 by mlray's stratification.

Row orders: ``random`` is what ``mlray prepare`` writes (each split stored in
random order); ``sorted`` is the same rows and splits stored sorted by their first
label, in source order, the way label files are exported and older manifests were
written. Baselines load each split into memory and draw a new permutation every
epoch, so the stored order cannot reach them: they run once per set and seed.

Recipes, all from the same EfficientNet-Lite0 ImageNet weights, same image size,
same epochs for the three that train end to end:

* seed: backbone frozen, flatten + dense sigmoid head, Adam lr 0.01, threshold 0.5;
* competent: global-pool head; one head-only epoch then the full network with
  AdamW and cosine, light augmentation, threshold 0.5;
* probe: frozen pooled features computed once, a linear head trained with BCE
  for up to 200 epochs, best epoch and threshold chosen on val;
* mlray: ``mlray train`` with the default config, then ``mlray evaluate`` at the
  thresholds it ships (tuned on val).

Everything is scored on the test split, which nothing tunes on.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from benchmarks.common import OUT, fmt_table, load_split, previous, record

N_TRAIN, N_TEST = 2000, 500


def _prepared(name: str, build, split: str) -> str:
    from mlray.data.prepare import prepare

    root = os.path.join(OUT, name)
    manifest = os.path.join(root, "manifest")
    if not os.path.exists(os.path.join(manifest, "_stats.json")):
        prepare(build(root), root, manifest, split=split, pack=True)
    return manifest


def scenes_manifest(seed: int = 0) -> str:
    from mlray.demo.datasets import openclipart_scenes

    return _prepared("scenes", lambda root: openclipart_scenes(root, N_TRAIN, N_TEST, size=256, seed=seed),
                     "train=0.9,val=0.1")


def keywords_manifest(seed: int = 0) -> str:
    from mlray.demo.datasets import openclipart_keywords

    return _prepared("keywords", lambda root: openclipart_keywords(root, seed=seed), "train=0.7,val=0.1,test=0.2")


SETS = {"scenes": scenes_manifest, "keywords": keywords_manifest}


def sorted_manifest(manifest: str) -> str:
    """The same rows and splits, stored sorted by split and then by first label,
    without the row-order key: a manifest written in source order."""
    from mlray.io.manifest import SPLITS, ManifestWriter, read_manifest

    out = manifest.rstrip("/") + "_sorted"
    if os.path.exists(os.path.join(out, "_stats.json")):
        return out
    table, vocab = read_manifest(manifest, with_images=True)
    index = {v: i for i, v in enumerate(vocab)}
    key = [
        (SPLITS.index(s), min((index[x] for x in labels), default=len(vocab)))
        for s, labels in zip(table.column("split").to_pylist(), table.column("labels").to_pylist())
    ]
    table = table.take(pa.array(sorted(range(len(key)), key=key.__getitem__)))
    writer = ManifestWriter(out, vocab)
    for i in range(0, table.num_rows, 256):
        writer.write(table.slice(i, 256))
    writer.close({"source": manifest, "order": "sorted by split, then first label"})
    return out


def _backbone():
    from mlray.config import ModelConfig
    from mlray.model.factory import create_model

    return create_model(ModelConfig(), num_classes=0)  # pooled 1280-d features


def _batches(n, bs, rng):
    order = rng.permutation(n)
    for i in range(0, n - bs + 1, bs):
        yield order[i : i + bs]


def _to_input(x_uint8, augment: bool):
    from mlray.model.augment import preprocess
    from mlray.config import AugmentConfig

    light = AugmentConfig(scale_min=0.8, color_jitter=0.0)  # "light": flips and mild crops
    return preprocess(torch.from_numpy(x_uint8), torch.device("cpu"), (0.5,) * 3, (0.5,) * 3, light if augment else None)


def _scores(model, images, bs=64):
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), bs):
            out.append(torch.sigmoid(model(_to_input(images[i : i + bs], False))).numpy())
    return np.concatenate(out)


def seed_recipe(data, epochs, seed, bs=32):
    """Frozen backbone, flatten + dense sigmoid head, Adam lr 0.01."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    (xtr, ytr), xte = data["train+val"], data["test"][0]
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
    scores = _scores(_FlattenHead(back, head), xte)
    return scores, scores >= 0.5


class _FlattenHead(torch.nn.Module):
    def __init__(self, back, head):
        super().__init__()
        self.back, self.head = back, head

    def forward(self, x):
        return self.head(self.back.forward_features(x).flatten(1))


def competent_recipe(data, epochs, seed, bs=32):
    """Global-pool head; one head-only epoch, then all layers, AdamW + cosine, light aug."""
    from mlray.config import ModelConfig
    from mlray.model.factory import create_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    (xtr, ytr), xte = data["train+val"], data["test"][0]
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
    scores = _scores(model, xte)
    return scores, scores >= 0.5


def _features(back, images, bs=128):
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), bs):
            out.append(back(_to_input(images[i : i + bs], False)))
    return torch.cat(out)


def probe_recipe(data, epochs, seed, max_epochs=200, bs=256):
    """Linear probe: pooled features of the frozen backbone computed once, a linear
    head trained with BCE to convergence; the epoch and the threshold with the best
    val mAP / F1 are kept (``epochs`` is not used: the probe runs to convergence)."""
    from mlray.config import ThresholdConfig
    from mlray.evaluation.metrics import ranking_metrics
    from mlray.model.thresholds import tune

    torch.manual_seed(seed)
    back = _backbone().eval()
    (xtr, ytr, _), (xva, yva, _), xte = data["train"], data["val"], data["test"][0]
    ftr, fva, fte = (_features(back, x) for x in (xtr, xva, xte))
    head = torch.nn.Linear(ftr.shape[1], ytr.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    y = torch.from_numpy(ytr).float()
    best, best_state = -1.0, None
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_epochs):
        for idx in torch.randperm(len(ftr), generator=gen).split(bs):
            loss = F.binary_cross_entropy_with_logits(head(ftr[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            val_map = ranking_metrics(torch.sigmoid(head(fva)).numpy(), yva)["mAP"]
        if val_map > best:
            best, best_state = val_map, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    with torch.no_grad():
        policy = tune(torch.sigmoid(head(fva)).numpy(), yva, ThresholdConfig(), prior=ytr.mean(axis=0))
        scores = torch.sigmoid(head(fte)).numpy()
    return scores, policy.predict(scores)


def mlray_recipe(manifest, epochs, seed, size, name, overrides=()):
    from mlray.config import build_config
    from mlray.evaluation.report import evaluate
    from mlray.training.trainer import train

    cfg = build_config(
        {"data": {"manifest": manifest, "image_size": size}, "optim": {"epochs": epochs, "seed": seed},
         "scaling": {"num_workers": 1, "cpus_per_worker": 1},
         "run": {"storage_path": os.path.join(OUT, "runs"), "name": name}},
        list(overrides),
    )
    result = train(cfg)
    return evaluate(result.run_dir, manifest, "test", compare_strategies=True)


BASELINES = {"seed": seed_recipe, "competent": competent_recipe, "probe": probe_recipe}


def _row(set_name, order, recipe, seed, m, never, t0):
    return {
        "set": set_name, "order": order, "recipe": recipe, "seed": seed, "test_mAP": m["mAP"],
        "f1_micro": m["f1_micro"], "f1_macro": m["f1_macro"], "no_label": m["images_without_prediction"],
        "never_predicted": never, "minutes": (time.time() - t0) / 60,
    }


def run_set(set_name: str, args, stamp: str) -> list[dict]:
    from mlray.evaluation.metrics import collapse_report, multilabel_metrics

    manifest = SETS[set_name]()
    manifests = {"random": manifest, "sorted": sorted_manifest(manifest)}
    rows = []
    baselines = [r for r in args.only if r in BASELINES]
    if baselines:
        split = {s: load_split(manifest, s, args.size) for s in ("train", "val", "test")}
        data = {**split, "train+val": tuple(np.concatenate(p) for p in zip(split["train"][:2], split["val"][:2]))}
        yte, vocab = split["test"][1], split["test"][2]
        prior = split["train"][1].mean(axis=0)
        for seed in args.seeds:
            for recipe in baselines:
                t0 = time.time()
                scores, pred = BASELINES[recipe](data, args.epochs, seed)
                m = multilabel_metrics(scores, yte, 0.5, prior=prior, predictions=pred)
                never = len(collapse_report(m, scores, 0.5, vocab, yte, predictions=pred)["never_predicted"])
                rows.append(_row(set_name, "any", recipe, seed, m, never, t0))
                print(rows[-1], flush=True)
    if "mlray" in args.only:
        for seed in args.seeds:
            for order in args.orders:
                t0 = time.time()
                doc = mlray_recipe(manifests[order], args.epochs, seed, args.size,
                                   f"quality-{stamp}-{set_name}-{order}-s{seed}", args.override)
                never = len(doc["collapse"]["never_predicted"])
                rows.append(_row(set_name, order, "mlray", seed, doc["metrics"], never, t0))
                print(rows[-1], flush=True)
    return rows


def summarize(rows: list[dict]) -> tuple[list[list], list[list]]:
    """Mean and spread per (set, order, recipe); and the targets of the row-order issue."""
    table, targets = [], []
    keys = sorted({(r["set"], r["order"], r["recipe"]) for r in rows}, key=lambda k: (k[0], k[2] != "mlray", k))
    mean = {}
    for key in keys:
        rs = [r for r in rows if (r["set"], r["order"], r["recipe"]) == key]
        maps = [r["test_mAP"] for r in rs]
        mean[key] = float(np.mean(maps))
        table.append([*key, mean[key], float(np.max(maps) - np.min(maps)), float(np.mean([r["f1_micro"] for r in rs])),
                      float(np.mean([r["no_label"] for r in rs])), max(r["never_predicted"] for r in rs), len(rs)])
    for set_name in sorted({k[0] for k in keys}):
        probe = mean.get((set_name, "any", "probe"))
        ours = {o: mean[(set_name, o, "mlray")] for o in ("random", "sorted") if (set_name, o, "mlray") in mean}
        for order, value in ours.items():
            if probe is not None:
                targets.append([set_name, f"mlray ({order}) >= probe + 0.02", value, probe + 0.02,
                                "met" if value >= probe + 0.02 else "NOT met"])
        if len(ours) == 2:
            gap = abs(ours["random"] - ours["sorted"])
            targets.append([set_name, "|sorted - random| <= 0.01", gap, 0.01, "met" if gap <= 0.01 else "NOT met"])
        never = max((r["never_predicted"] for r in rows if r["set"] == set_name and r["recipe"] == "mlray"), default=0)
        targets.append([set_name, "mlray: labels with test positives never predicted", float(never), 0.0,
                        "met" if never == 0 else "NOT met"])
    return table, targets


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--orders", nargs="+", default=["random", "sorted"], choices=["random", "sorted"])
    ap.add_argument("--only", nargs="*", default=["seed", "competent", "probe", "mlray"])
    ap.add_argument("--override", nargs="*", default=[], help="extra mlray config overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    stamp = time.strftime("%H%M%S")
    # Rows of recipes and sets not run now are kept from earlier runs (with the same
    # --epochs/--size/--seeds), so `--only mlray` after a change re-measures mlray
    # against baselines measured once.
    kept = [r for r in previous("quality") if r["set"] not in args.sets or r["recipe"] not in args.only]
    rows = []
    for set_name in args.sets:
        rows += run_set(set_name, args, stamp)
        record("quality", kept + rows)
    table, targets = summarize(kept + rows)
    print(f"\nquality on the test splits, {args.size}px, {args.epochs} epochs, seeds {args.seeds}")
    print(fmt_table(["set", "order", "recipe", "test mAP", "spread", "F1 micro", "no label",
                     "never predicted (max)", "runs"], table))
    print(fmt_table(["set", "target", "measured", "bound", ""], targets))


if __name__ == "__main__":
    main()

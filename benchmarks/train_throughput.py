"""Training throughput: the mlray loop (Ray Data -> Ray Train, 1 worker) against a
plain single-process PyTorch loop on the same model, images, batch size and
augmentation, in one run.

    python -m benchmarks.train_throughput [--images 1200] [--size 128] [--batch 32] [--epochs 4]

The plain loop trains from images already decoded in memory: it is the compute
bound, so the ratio is everything mlray adds (streaming decode, Ray Train, the
per-step agreement between workers, metrics). Each side's steady rate is its
median epoch after the first (3 of them by default: with 2 a single slow epoch
on a shared machine moved the median by 10%); the first epoch, start-up
included, is reported apart.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from benchmarks.common import (
    OUT, fmt_spread, fmt_table, interleaved, load_split, mosaic_manifest, paired_ratio, record, spread, steady_rate,
)


def plain_loop(manifest: str, size: int, batch: int, epochs: int) -> list[float]:
    """Images/s of each epoch of a plain PyTorch loop over images decoded in memory."""
    from mlray.model.augment import preprocess
    from mlray.config import AugmentConfig, LossConfig, ModelConfig, OptimConfig
    from mlray.training.losses import create_loss
    from mlray.model.factory import create_model, freeze_norm_stats, init_head, param_groups

    torch.set_num_threads(os.cpu_count() or 1)
    x, y, vocab = load_split(manifest, "train", size)
    model = create_model(ModelConfig(), len(vocab)).to(memory_format=torch.channels_last)
    init_head(model, list(y.mean(axis=0)))
    opt = torch.optim.AdamW(param_groups(model, OptimConfig()), lr=1e-3)
    loss_fn = create_loss(LossConfig())
    aug = AugmentConfig()
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(epochs):
        model.train()
        freeze_norm_stats(model, all_layers=True)
        t, n = time.perf_counter(), 0
        order = rng.permutation(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            xb = preprocess(torch.from_numpy(x[idx]), torch.device("cpu"), (0.5,) * 3, (0.5,) * 3, aug)
            loss = loss_fn(model(xb), torch.from_numpy(y[idx]).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(idx)
        rates.append(n / (time.perf_counter() - t))
    return rates


def mlray_loop(manifest: str, size: int, batch: int, epochs: int, overrides=()) -> list[float]:
    """Images/s of each epoch of ``mlray train`` (1 worker), as its history records them."""
    from mlray.config import build_config
    from mlray.training.trainer import train

    cfg = build_config({
        "data": {"manifest": manifest, "image_size": size, "batch_size": batch},
        "optim": {"epochs": epochs, "freeze_epochs": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "run": {"storage_path": os.path.join(OUT, "runs"), "name": f"throughput-{time.strftime('%H%M%S')}"},
    }, list(overrides))
    hist = train(cfg).history
    return [h["images_per_s"] for h in hist]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--override", nargs="*", default=[])
    args = ap.parse_args(argv)
    manifest = mosaic_manifest(args.images, args.size)
    common = (manifest, args.size, args.batch, args.epochs)
    res = interleaved({
        "mlray": ("benchmarks.train_throughput", "mlray_loop", *common, list(args.override)),
        "plain": ("benchmarks.train_throughput", "plain_loop", *common),
    }, args.rounds)
    ours, plain = ([steady_rate(r) for r in res[k]] for k in ("mlray", "plain"))
    rows = [{"benchmark": "train", "mlray_img_s": spread(ours),
             "baseline": "plain PyTorch, decoded in memory, same malloc settings",
             "baseline_img_s": spread(plain), "ratio": paired_ratio(ours, plain),
             "first_epoch_ratio": paired_ratio([r[0] for r in res["mlray"]], [r[0] for r in res["plain"]])}]
    record("train", rows)
    r = rows[0]
    print(fmt_table(["mlray img/s (1 worker)", "plain PyTorch img/s", "ratio (median, range)", "first epoch ratio"],
                    [[fmt_spread(r["mlray_img_s"]), fmt_spread(r["baseline_img_s"]), fmt_spread(r["ratio"], 2),
                      fmt_spread(r["first_epoch_ratio"], 2)]]))
    return rows


if __name__ == "__main__":
    main()

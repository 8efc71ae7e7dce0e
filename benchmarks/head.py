"""New labels from stored embeddings: ``mlray head`` against the linear probe and
a full ``mlray train``, on the 101-label keywords set (real clip art; needs
Debian's ``openclipart-png`` and ``openclipart-svg``).

    python -m benchmarks.head [--seeds 0,1] [--size 160] [--epochs 5] [--skip-train]

* source run: the ImageNet EfficientNet-Lite0 with a head trained one epoch on
  the keywords train split, backbone frozen with its BatchNorm statistics (so
  its backbone *is* the ImageNet one: the probe's features). Made once, cached.
* embeddings: ``mlray tag --embeddings`` over the whole manifest (timed once:
  the cost a corpus pays one time).
* mlray head: ``mlray head`` on those embeddings with the keywords labels, then
  ``mlray evaluate`` on the test split (timed: the head command alone).
* linear probe: ``benchmarks.quality``'s probe (features computed in memory,
  BCE to convergence, best val epoch, thresholds tuned on val).
* full train: ``mlray train`` with the defaults for ``--epochs`` epochs, then
  ``mlray evaluate`` (timed: train + evaluate).

Everything is scored on the test split; nothing tunes on it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np

from benchmarks.common import OUT, cached_run, fmt_table, load_split, record


def source_run(manifest: str, size: int) -> str:
    return cached_run(f"head-source-{size}", manifest, size, epochs=1, freeze_epochs=1)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the full train")
    ap.add_argument("--skip-train", action="store_true", help="leave out the full train (minutes per seed)")
    args = ap.parse_args(argv)
    from benchmarks.quality import BASELINES, keywords_manifest, mlray_recipe
    from mlray.training.head import HeadOptions, train_head
    from mlray.evaluation.metrics import multilabel_metrics
    from mlray.evaluation.report import evaluate
    from mlray.runtime import init_ray
    from mlray.tagging.job import TagOptions, tag

    seeds = [int(s) for s in args.seeds.split(",")]
    manifest = keywords_manifest()
    init_ray()
    run = source_run(manifest, args.size)
    emb = os.path.join(os.path.abspath(OUT), f"head-embeddings-{args.size}")
    shutil.rmtree(emb, ignore_errors=True)
    t0 = time.time()
    s = tag(run, manifest, emb, TagOptions(embeddings=True))
    tag_s = time.time() - t0
    print(f"embeddings of {s.rows_written} images: {tag_s:.1f} s", flush=True)
    rows = []

    def add(recipe, seed, m, seconds):
        rows.append({"set": "keywords", "recipe": recipe, "seed": seed, "test_mAP": m["mAP"], "f1_micro": m["f1_micro"],
                     "f1_macro": m["f1_macro"], "seconds": seconds})
        print(rows[-1], flush=True)

    split = {k: load_split(manifest, k, args.size) for k in ("train", "val", "test")}
    yte = split["test"][1]
    prior = split["train"][1].mean(axis=0)
    data = split
    for seed in seeds:  # interleaved: every recipe once per seed
        out = os.path.join(os.path.abspath(OUT), "runs", f"keywords-head-s{seed}")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        res = train_head(run, emb, manifest, out, HeadOptions(seed=seed))
        head_s = time.time() - t0
        assert res.computed == 0, res.computed
        add("mlray head", seed, evaluate(out, manifest, "test", compare_strategies=False)["metrics"], head_s)
        t0 = time.time()
        scores, pred = BASELINES["probe"](data, args.epochs, seed)
        add("linear probe", seed, multilabel_metrics(scores, yte, 0.5, prior=prior, predictions=pred), time.time() - t0)
        if not args.skip_train:
            t0 = time.time()
            doc = mlray_recipe(manifest, args.epochs, seed, args.size, f"keywords-full-{int(t0)}-s{seed}")
            add("mlray train", seed, doc["metrics"], time.time() - t0)
    record("head", rows)
    table = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        rs = [r for r in rows if r["recipe"] == recipe]
        cell = {k: [r[k] for r in rs] for k in ("test_mAP", "f1_micro", "seconds")}
        table.append([recipe, f"{np.mean(cell['test_mAP']):.3f} ({min(cell['test_mAP']):.3f}-{max(cell['test_mAP']):.3f})",
                      f"{np.mean(cell['f1_micro']):.3f}", f"{np.median(cell['seconds']):.1f}", len(rs)])
    print(fmt_table(["recipe", "test mAP (mean, range)", "F1 micro", "wall s (median)", "seeds"], table))
    print(f"embeddings (once per corpus, {s.rows_written} images at {args.size} px): {tag_s:.1f} s")
    return rows


if __name__ == "__main__":
    main()

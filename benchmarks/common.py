"""Shared pieces of the benchmarks: data sets, in-memory decoding for the plain
PyTorch baselines, and the result table. Every benchmark measures mlray and its
baseline in the same run and reports the ratio, not a bare time."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc

if TYPE_CHECKING:
    from PIL import Image

OUT = os.environ.get("MLRAY_BENCH_OUT", "out/bench")
RESULTS = os.path.join(OUT, "results.json")


def record(section: str, rows: list[dict]) -> None:
    """Merge one benchmark's rows into out/bench/results.json."""
    os.makedirs(OUT, exist_ok=True)
    doc = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    doc[section] = rows
    with open(RESULTS, "w") as f:
        json.dump(doc, f, indent=1)


def previous(section: str) -> list[dict]:
    """The rows an earlier run recorded for ``section`` (empty when none)."""
    doc = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    return list(doc.get(section, []))


def steady_rate(rates: list[float]) -> float:
    """Images/s of a run measured per epoch: the median after the first (warm-up)
    epoch, which is steadier on a shared 2-core machine than any single epoch."""
    return float(np.median(rates[1:] if len(rates) > 1 else rates))


@contextmanager
def timer():
    box = {}
    t = time.perf_counter()
    yield box
    box["s"] = time.perf_counter() - t


def mosaic_manifest(n: int, size: int, *, seed: int = 0, split: str = "train=0.85,val=0.15") -> str:
    """A packed manifest of ``n`` real MNIST mosaics (cached under out/bench)."""
    from mlray.demo.datasets import mnist_mosaics
    from mlray.data.prepare import prepare

    root = os.path.join(OUT, f"mosaics_{n}_{size}_{seed}")
    manifest = os.path.join(root, "manifest")
    if not os.path.exists(os.path.join(manifest, "_stats.json")):
        csv_path = mnist_mosaics(root, n, size=size, seed=seed)
        prepare(csv_path, root, manifest, split=split, pack=True)
    return manifest


def load_split(manifest: str, split: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode one split fully into memory: (N, size, size, 3) uint8, (N, C) targets, vocab."""
    from mlray.data.images import decode
    from mlray.io.manifest import multi_hot, read_manifest

    table, vocab = read_manifest(manifest, with_images=True)
    table = table.filter(pc.equal(table.column("split"), split))
    images = np.stack([decode(b, size) for b in table.column("image").to_pylist()])
    return images, multi_hot(table.column("labels"), vocab), vocab


def tree_pss(pid: int) -> int:
    """Summed PSS in bytes of a process and all its descendants (Ray's workers are
    the raylet's children, outside the job's process group): pages shared between
    processes, the object store's above all, counted once. Read from
    ``smaps_rollup``, cheap enough to sample while a job is being timed."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def fmt_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def in_fresh_process(module: str, func: str, *args):
    """Run ``module.func(*args)`` in its own process and return its (JSON) result.

    Every case of a benchmark runs this way, so nothing of an earlier case (a local
    Ray, its idle workers, a DataLoader's processes) is alive while the next one is
    timed; baselines get the malloc settings mlray gives its Ray workers
    (``mlray.runtime.WORKER_ENV``), so a ratio measures the framework, not the
    allocator."""
    from mlray.runtime import WORKER_ENV

    code = f"import json, {module} as m; print('RESULT ' + json.dumps(m.{func}(*{list(args)!r})))"
    return run_code(code, WORKER_ENV)


def run_code(code: str, env: dict | None = None):
    """Run Python ``code`` in a fresh interpreter; it prints ``RESULT <json>``, which is
    returned once every process it started has exited (``wait_group_gone``)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {}), "RAY_AUTH_MODE": "disabled"}, start_new_session=True)
    stdout, stderr = proc.communicate()
    wait_group_gone(proc.pid)
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"failed:\n{code}\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def wait_group_gone(pgid: int, timeout: float = 60.0) -> None:
    """Wait until no process of group ``pgid`` is left. A local Ray's workers stop
    a second or two after its driver has exited (when they see their raylet gone);
    the next case of a benchmark must not share the cores with them."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    raise RuntimeError(f"processes of group {pgid} still running {timeout:.0f} s after its leader exited (killed)")


def cached_run(name: str, manifest: str, size: int, **optim) -> str:
    """A short real training run under out/bench/runs (trained once, then reused)."""
    from mlray.config import build_config
    from mlray.training.trainer import train

    run = os.path.join(os.path.abspath(OUT), "runs", name)
    if os.path.exists(os.path.join(run, "model.safetensors")):
        return run
    cfg = build_config({
        "data": {"manifest": manifest, "image_size": size}, "optim": optim,
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "run": {"storage_path": os.path.join(os.path.abspath(OUT), "runs"), "name": name},
    })
    return train(cfg).run_dir


def interleaved(cases: dict[str, tuple], rounds: int) -> dict[str, list]:
    """Each case (``module, func, *args``) once per round, in order (A, B, A, B, ...),
    each in a fresh process; the results per case, one per round. On a shared,
    noisy machine a slow spell then hits every case alike instead of one."""
    results: dict[str, list] = {name: [] for name in cases}
    for r in range(rounds):
        for name, (module, func, *args) in cases.items():
            results[name].append(in_fresh_process(module, func, *args))
            print(f"round {r + 1}/{rounds} {name}: {results[name][-1]}", flush=True)
    return results


def spread(values: list[float]) -> dict:
    """Median and range of repeated measurements."""
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)), "n": len(values)}


def paired_ratio(ours: list[float], base: list[float]) -> dict:
    """The ratio of each round's pair (interleaved runs), as median and range."""
    return spread([a / b for a, b in zip(ours, base)])


def fmt_spread(d: dict, digits: int = 1) -> str:
    return f"{d['median']:,.{digits}f} ({d['min']:,.{digits}f}-{d['max']:,.{digits}f})"


# ---------------------------------------------------------------------------- photo-like images

PHOTO_SHAPES = ("disc", "square", "triangle", "ring", "bar", "cross")
PHOTO_SIZES = ((640, 480), (480, 640), (800, 600))


def _noise(rng: np.random.Generator, h: int, w: int, octaves: int = 5) -> np.ndarray:
    """Cloud-like texture in [0, 1]: random grids from 1/64 to 1/4 of the image
    size, each upscaled bicubically and summed with falling weights (at half
    size, then upscaled once: the sensor noise added later is the fine grain)."""
    from PIL import Image

    hh, hw = max(2, h // 2), max(2, w // 2)
    out = np.zeros((hh, hw), np.float32)
    weight = 1.0
    for k in range(octaves):
        grid = rng.random((max(2, h >> (octaves + 1 - k)), max(2, w >> (octaves + 1 - k))), dtype=np.float32)
        out += weight * np.asarray(Image.fromarray(grid, "F").resize((hw, hh), Image.BICUBIC))
        weight *= 0.6
    out = np.asarray(Image.fromarray(out, "F").resize((w, h), Image.BICUBIC))
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def _textured(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float RGB: a texture blending two random colours."""
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    return c0 + (c1 - c0) * _noise(rng, h, w)[..., None]


def _shape_mask(shape: str, s: int) -> np.ndarray:
    """(s + 8, s + 8, 1) alpha in [0, 1] of one shape, edges softened as a lens would."""
    from PIL import Image, ImageDraw, ImageFilter

    mask = Image.new("L", (s + 8, s + 8), 0)
    d, o = ImageDraw.Draw(mask), 4
    if shape == "disc":
        d.ellipse((o, o, o + s, o + s), fill=255)
    elif shape == "square":
        d.rectangle((o, o, o + s, o + s), fill=255)
    elif shape == "triangle":
        d.polygon([(o, o + s), (o + s, o + s), (o + s // 2, o)], fill=255)
    elif shape == "ring":
        d.ellipse((o, o, o + s, o + s), outline=255, width=max(4, s // 8))
    else:  # bar, and cross = bar + its upright
        d.rectangle((o, o + s * 2 // 5, o + s, o + s * 3 // 5), fill=255)
        if shape == "cross":
            d.rectangle((o + s * 2 // 5, o, o + s * 3 // 5, o + s), fill=255)
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(1.0)), np.float32)[..., None] / 255


def photo(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, set[str]]:
    """One photo-like picture and its labels: 1-3 textured shapes of different
    kinds on a textured background, uneven lighting, sensor noise."""
    from PIL import Image

    img = _textured(rng, height, width)
    labels = set()
    for k in rng.choice(len(PHOTO_SHAPES), size=int(rng.integers(1, 4)), replace=False):
        shape = PHOTO_SHAPES[int(k)]
        labels.add(shape)
        alpha = _shape_mask(shape, int(rng.uniform(0.2, 0.45) * min(width, height)))
        bh, bw = alpha.shape[:2]
        y, x = int(rng.integers(0, height - bh)), int(rng.integers(0, width - bw))
        part = img[y : y + bh, x : x + bw]  # a view: blended in place
        part += (_textured(rng, bh, bw) - part) * alpha
    cx = np.cos((np.arange(width, dtype=np.float32) / width - rng.uniform()) * np.pi)
    cy = np.cos((np.arange(height, dtype=np.float32) / height - rng.uniform()) * np.pi)
    img *= (0.75 + 0.35 * cy[:, None] * cx[None, :])[..., None]
    img += 4 * rng.standard_normal((height, width, 3), dtype=np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), labels


def photo_set(root: str, n: int, *, seed: int = 0, quality: int = 90) -> str:
    """``n`` photo-like JPEGs under ``root/images`` and ``root/labels.csv`` (``filename``
    and one 0/1 column per shape, what ``mlray prepare`` reads); returns the CSV path.

    Camera-sized (640x480, 480x640, 800x600), baseline JPEG with 4:2:0 chroma as
    cameras write them, and textured all over, so decoders and resizers have real
    work: the mosaics are small, flat and already at the model's size. Made from
    numpy and Pillow alone (no extra package, no network), and deterministic:
    image i comes from the seed (seed, i). Cached: an existing set of ``n`` is reused.
    """
    import csv

    path = os.path.join(root, "labels.csv")
    if os.path.exists(path):
        with open(path) as f:
            if sum(1 for _ in f) == n + 1:
                return path
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        img, labels = photo(np.random.default_rng([seed, i]), *PHOTO_SIZES[i % len(PHOTO_SIZES)])
        name = f"images/photo_{i:05d}.jpg"
        img.save(os.path.join(root, name), format="JPEG", quality=quality)
        rows.append([name, *(int(s in labels) for s in PHOTO_SHAPES)])
    with open(path + ".tmp", "w", newline="") as f:
        csv.writer(f).writerows([["filename", *PHOTO_SHAPES], *rows])
    os.replace(path + ".tmp", path)  # last: a set cut short is made again, not reused
    return path


# ---------------------------------------------------------------------------- tagging steady state


def part_times(out: str) -> list[tuple[float, int]]:
    """(modification time, rows) of each Parquet part of a tag OUT, oldest first.
    A part appears atomically when its rows are written, so the times trace the
    job's progress from inside one run."""
    from mlray.io.tagged import out_files

    parts = out_files(out)
    return sorted((os.stat(f).st_mtime_ns / 1e9, rows) for f, rows in zip(parts.files, parts.rows))


def steady_from_parts(parts: list[tuple[float, int]], warmup: float = 0.25) -> dict:
    """Images/s of a job in steady state from its parts' times (``part_times``): the
    rows of the parts after the first ``warmup`` share, up to the last part but
    one, over the time from the last part of that share to the last part counted.
    Start-up (Ray, the model, the first batches) falls before the window, and the
    stream's tail, flushed at the end, after it. Needs 4 parts or more."""
    if len(parts) < 4:
        raise ValueError(f"{len(parts)} output parts: 4 or more are needed to time a steady state "
                         "(lower --rows-per-file or tag more images)")
    last = len(parts) - 2
    k = min(max(1, round(warmup * len(parts))), last)
    rows = sum(r for _, r in parts[k : last + 1])
    seconds = parts[last][0] - parts[k - 1][0]
    return {"img_s": rows / max(seconds, 1e-9), "rows": rows, "seconds": seconds, "parts": len(parts),
            "parts_timed": last + 1 - k}

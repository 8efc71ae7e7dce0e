"""Shared pieces of the benchmarks: data sets, in-memory decoding for the plain
PyTorch baselines, and the result table. Every benchmark measures mlray and its
baseline in the same run and reports the ratio, not a bare time."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import numpy as np
import pyarrow.compute as pc

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
    from mlray.datasets import mnist_mosaics
    from mlray.prepare import prepare

    root = os.path.join(OUT, f"mosaics_{n}_{size}_{seed}")
    manifest = os.path.join(root, "manifest")
    if not os.path.exists(os.path.join(manifest, "_stats.json")):
        csv_path = mnist_mosaics(root, n, size=size, seed=seed)
        prepare(csv_path, root, manifest, split=split, pack=True)
    return manifest


def load_split(manifest: str, split: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode one split fully into memory: (N, size, size, 3) uint8, (N, C) targets, vocab."""
    from mlray.images import decode
    from mlray.manifest import multi_hot, read_manifest

    table, vocab = read_manifest(manifest, with_images=True)
    table = table.filter(pc.equal(table.column("split"), split))
    images = np.stack([decode(b, size) for b in table.column("image").to_pylist()])
    return images, multi_hot(table.column("labels"), vocab), vocab


def fmt_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def in_fresh_process(module: str, func: str, *args) -> float:
    """Run a baseline in its own process with the same malloc settings mlray gives
    its Ray workers (``mlray.runtime.WORKER_ENV``), so a ratio measures the
    framework, not the allocator."""
    import subprocess
    import sys

    from mlray.runtime import WORKER_ENV

    code = f"import json, {module} as m; print(json.dumps(m.{func}(*{list(args)!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **WORKER_ENV})
    return float(out.stdout.strip().splitlines()[-1])

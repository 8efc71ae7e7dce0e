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

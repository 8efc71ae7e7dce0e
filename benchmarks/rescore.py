"""Rescoring a corpus from stored embeddings (``mlray tag --from-embeddings``):
rows per second and memory, against a plain single-process loop.

    python -m benchmarks.rescore [--sizes 100000,1000000] [--repeats 2]

The source is synthetic (say so when quoting it): a tag output of N rows in the
tagging schema with random float16 embeddings of EfficientNet-Lite0's width
(1,280), recorded as made by the benchmark run's backbone, in parts of 20,000
rows (cached under out/bench). Each case runs in a fresh process:

* mlray: ``tag(run, SOURCE, OUT, TagOptions(from_embeddings=True))``, Ray start,
  plan and lease included; also the rate after planning.
* plain loop: read each part with pyarrow, one matrix product, sigmoid, thresholds,
  write a Parquet part; one process, nothing else (the floor of the work).

Peak memory is the largest sampled sum of PSS (resident memory, pages shared
between processes such as Ray's object store split among them, so counted once)
over the process and all its children (Ray's workers included), and the
driver's own peak RSS. Cases are
interleaved (mlray and loop at each size, every round); medians and ranges.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import pyarrow as pa

from benchmarks.common import OUT, fmt_table, mosaic_manifest, record, run_code

PART_ROWS = 20_000
DIM = 1280

_SAMPLER = '''
import os, threading, time
from benchmarks.common import tree_pss
_peak = [0]
def _sample():
    while True:
        _peak[0] = max(_peak[0], tree_pss(os.getpid()))
        time.sleep(0.5)
threading.Thread(target=_sample, daemon=True).start()
'''


def synthetic_source(n: int, run: str) -> str:
    """A tag output of ``n`` rows with random embeddings made, as its metadata says,
    by ``run``'s backbone (cached)."""
    import pyarrow.parquet as pq

    from mlray.io.tagged import PARQUET_OPTIONS, score_schema
    from mlray.model.predictor import Predictor

    src = os.path.join(os.path.abspath(OUT), f"rescore_src_{n}")
    done = os.path.join(src, "_synthetic.json")
    if os.path.exists(done):
        return src
    os.makedirs(src, exist_ok=True)
    p = Predictor.load(run, "cpu")
    assert p.embedding_dim == DIM, p.embedding_dim
    info = {"model": p.art.model_id, "dim": DIM, "backbone_digest": p.backbone_digest}
    schema = score_schema(p.vocab, info)
    c = len(p.vocab)
    rng = np.random.default_rng(0)
    for k, start in enumerate(range(0, n, PART_ROWS)):
        m = min(PART_ROWS, n - start)
        ids = pa.array([f"img/{i:09d}.jpg" for i in range(start, start + m)], pa.string())
        emb = (rng.standard_normal((m, DIM), np.float32) * 0.5).astype(np.float16)
        table = pa.table({
            "image_id": ids, "uri": pa.array([f"s3://corpus/img/{i:09d}.jpg" for i in range(start, start + m)]),
            "scores": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(m * c, np.float32)), c).cast(pa.list_(pa.float32())),
            "labels": pa.array([[p.vocab[0]]] * m, pa.list_(pa.string())),
            "model": pa.array([p.art.model_id] * m, pa.string()), "error": pa.nulls(m, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM).cast(pa.list_(pa.float16())),
        }, schema=schema)
        pq.write_table(table, os.path.join(src, f"part-synthetic-{k:06d}.parquet"), **PARQUET_OPTIONS)
    json.dump({"rows": n}, open(done, "w"))
    return src


def plain_loop(run: str, src: str, out: str) -> None:
    """The floor: each part read, scored by one matrix product, written; one process."""
    import glob

    import pyarrow.parquet as pq

    from mlray.tagging.rescore import EmbeddingScores
    from mlray.io.tagged import PARQUET_OPTIONS

    from mlray.model.predictor import Predictor

    scorer = EmbeddingScores.from_predictor(Predictor.load(run, "cpu"))
    os.makedirs(out, exist_ok=True)
    for k, f in enumerate(sorted(glob.glob(os.path.join(src, "*.parquet")))):
        t = pq.read_table(f, columns=["image_id", "uri", "embedding", "error"])
        pq.write_table(scorer(t), os.path.join(out, f"part-{k:06d}.parquet"), **PARQUET_OPTIONS)


def one_case(kind: str, run: str, src: str, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    if kind == "mlray":
        body = (
            "from mlray.tagging.job import tag, TagOptions\n"
            f"s = tag({run!r}, {src!r}, {out!r}, TagOptions(from_embeddings=True))\n"
            "r = {'rows': s.rows_written, 'seconds': s.seconds, 'plan_s': s.plan_seconds}\n"
        )
    else:
        body = (
            "import time, pyarrow.parquet as pq; from benchmarks.rescore import plain_loop\n"
            f"t = time.perf_counter(); plain_loop({run!r}, {src!r}, {out!r})\n"
            "seconds = time.perf_counter() - t\n"
            f"rows = sum(pq.read_metadata(f).num_rows for f in __import__('glob').glob({out!r} + '/*.parquet'))\n"
            "r = {'rows': rows, 'seconds': seconds, 'plan_s': 0.0}\n"
        )
    code = (
        _SAMPLER + "import json, resource\n" + body
        + "r['peak_all'] = _peak[0]; r['peak_driver'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print('RESULT ' + json.dumps(r))\n"
    )
    r = run_code(code)
    r["rows_per_s"] = r["rows"] / r["seconds"]
    r["rows_per_s_after_plan"] = r["rows"] / max(r["seconds"] - r["plan_s"], 1e-9)
    return r


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    from benchmarks.tag_throughput import trained_run

    run = trained_run(mosaic_manifest(600, 128), 128)
    sizes = [int(x) for x in args.sizes.split(",")]
    sources = {n: synthetic_source(n, run) for n in sizes}
    out = os.path.join(os.path.abspath(OUT), "rescore_out")
    results: dict = {}
    for rep in range(args.repeats):
        for n in sizes:
            for kind in ("mlray", "loop"):  # interleaved: every case once per round
                r = one_case(kind, run, sources[n], out)
                assert r["rows"] == n, r
                results.setdefault((n, kind), []).append(r)
                print(f"round {rep + 1}: {n:,} rows, {kind}: {r['rows_per_s']:,.0f} rows/s "
                      f"({r['rows_per_s_after_plan']:,.0f} after planning), peak {r['peak_all'] / 2**20:,.0f} MB "
                      f"all processes, driver {r['peak_driver'] / 2**20:,.0f} MB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    rows = []
    for (n, kind), rs in results.items():
        rate = [r["rows_per_s"] for r in rs]
        after = [r["rows_per_s_after_plan"] for r in rs]
        peak = [r["peak_all"] / 2**20 for r in rs]
        rows.append({
            "benchmark": f"rescore from embeddings, {n:,} synthetic rows, {kind}", "rows": n, "kind": kind,
            "rows_per_s_median": float(np.median(rate)), "rows_per_s_range": [min(rate), max(rate)],
            "rows_per_s_after_plan_median": float(np.median(after)),
            "peak_mb_all_median": float(np.median(peak)), "peak_mb_all_range": [min(peak), max(peak)],
            "peak_mb_driver_median": float(np.median([r["peak_driver"] / 2**20 for r in rs])), "repeats": len(rs),
        })
    by = {(r["rows"], r["kind"]): r for r in rows}
    for r in rows:
        loop = by[(r["rows"], "loop")]
        r["vs_loop"] = r["rows_per_s_median"] / loop["rows_per_s_median"]
        r["peak_vs_smallest"] = r["peak_mb_all_median"] / by[(min(sizes), r["kind"])]["peak_mb_all_median"]
    record("rescore", rows)
    print(fmt_table(
        ["rows", "kind", "rows/s (median, range)", "after plan", "x loop", "peak MB all (median, range)", "x smallest"],
        [[f"{r['rows']:,}", r["kind"],
          f"{r['rows_per_s_median']:,.0f} ({r['rows_per_s_range'][0]:,.0f}-{r['rows_per_s_range'][1]:,.0f})",
          f"{r['rows_per_s_after_plan_median']:,.0f}", f"{r['vs_loop']:.2f}",
          f"{r['peak_mb_all_median']:,.0f} ({r['peak_mb_all_range'][0]:,.0f}-{r['peak_mb_all_range'][1]:,.0f})",
          f"{r['peak_vs_smallest']:.2f}"] for r in rows],
    ))
    print("target: mlray >= 50,000 rows/s at 1,000,000 rows on this 2-core machine; peak memory flat in rows")
    return rows


if __name__ == "__main__":
    main()

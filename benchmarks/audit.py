"""Finding label errors: ``mlray audit`` against plain disagreement, confident-learning
thresholds and cleanlab, on real clip art with injected noise; then the fix loop.

    python -m benchmarks.audit [--sets keywords scenes] [--noise-seed 0] [--size 160] [--train [SET ...]]
    python -m benchmarks.audit --scale 1000000        # time and memory on synthetic stored embeddings

Data (Debian's ``openclipart-png`` and ``openclipart-svg``): the keywords set
(2,865 clip-art images, their authors' keywords, 101 labels) and the scenes set
(2,300 composed scenes, 13 object classes), as ``benchmarks.quality`` builds
them. The noisy manifest lists rows in export order (the CSV's, grouped by
category) and differs from the clean one by seeded noise over all splits: 10%
of the positive (image, label) pairs removed (*missing*), and false positives
equal to 3% of the positives added, each on a label drawn by its frequency and
an image without it (*wrong*).

Every ranking is computed from the same out-of-fold scores (the audit's
DIR/scores): mlray's suspicion; |y - p|; confident learning's per-label
threshold t = mean out-of-fold score of the label's labelled positives (p / t
for missing, 1 - p / t for wrong); cleanlab's per-class label-quality scores
(self-confidence and normalized margin, with and without its class-imbalance
adjustment). AUPRC over all pairs of a kind (labelled 0 for missing, 1 for
wrong), and precision at N, N = the pairs injected of that kind.

The loop: the top N of mlray's ranking (N = all pairs injected) go to a
reviewer who keeps the true errors (the clean labels decide), written as a
fixes.csv and applied by ``prepare --fixes``; ``mlray head`` is then trained on
noisy, audited and clean labels (same embeddings, same options) and scored on
the test split's clean labels; ``--train`` adds a full ``mlray train`` on each
(``--train keywords``: on that set only).
Nothing tunes on the test split; the suspicion's constants were chosen on
``--noise-seed 1``'s train and val rows, and the results are reported at seed 0.

``--scale N``: N synthetic float16 embeddings of EfficientNet-Lite0's width in
a tag output (parts of 20,000 rows) with 20 labels a random linear rule makes
from them, noise injected as above; the audit's wall time, the driver's peak
RSS and the peak summed PSS of its process tree (Ray's workers included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.common import OUT, fmt_table, record

MISSING_SHARE, WRONG_SHARE = 0.10, 0.03


# ---------------------------------------------------------------------------- noise


def inject_noise(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy labels from clean ``y`` (N, C): 10% of positives removed, false positives
    equal to 3% of positives added (label by frequency, an image without it).
    Returns (noisy, missing mask, wrong mask)."""
    rng = np.random.default_rng(seed)
    noisy = y.copy()
    r, c = np.nonzero(y)
    drop = rng.choice(len(r), int(round(MISSING_SHARE * len(r))), replace=False)
    noisy[r[drop], c[drop]] = 0
    freq = y.sum(0) / y.sum()
    wrong = np.zeros_like(y, bool)
    want = int(round(WRONG_SHARE * len(r)))
    while wrong.sum() < want:
        j = rng.choice(y.shape[1], p=freq)
        i = int(rng.integers(y.shape[0]))
        if y[i, j] == 0 and not wrong[i, j]:
            wrong[i, j] = True
    noisy[wrong] = 1
    missing = (y == 1) & (noisy == 0)
    return noisy, missing, wrong


def noisy_manifest(clean: str, seed: int, dest: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The clean manifest's rows with noisy labels, in export order (by id, as the
    CSV lists them), with its packed bytes (so a full train reads the same images).
    Returns (manifest, clean y, missing, wrong, ids) in that order."""
    from mlray.io.manifest import ManifestWriter, multi_hot, read_manifest

    table, vocab = read_manifest(clean, with_images=True)
    table = table.take(pc.sort_indices(table.column("image_id")))
    y = multi_hot(table.column("labels"), vocab)
    noisy, missing, wrong = inject_noise(y, seed)
    lab = [[vocab[j] for j in np.flatnonzero(row)] for row in noisy]
    table = table.set_column(table.column_names.index("labels"), "labels", pa.array(lab, pa.list_(pa.string())))
    shutil.rmtree(dest, ignore_errors=True)
    w = ManifestWriter(dest, vocab)
    for i in range(0, table.num_rows, 4096):
        w.write(table.slice(i, 4096))
    w.close({"source": clean, "noise_seed": seed})
    return dest, y, missing, wrong, table.column("image_id").to_pylist()


# ---------------------------------------------------------------------------- rankings


def oof_scores(audit_dir: str, n: int, c: int) -> np.ndarray:
    """The audit's out-of-fold scores as (N, C), rows in the audited manifest's order
    (the ``row`` column); NaN for rows not audited."""
    from mlray.audit.work import read_scores

    s = np.full((n, c), np.nan, np.float32)
    for f in sorted(os.listdir(os.path.join(audit_dir, "scores"))):
        rows, _, scores = read_scores(os.path.join(audit_dir, "scores", f))
        s[rows] = scores
    return s


def rankings(s: np.ndarray, y: np.ndarray, min_positives: int) -> dict[str, np.ndarray]:
    """Every method's suspicion of every pair (higher = more likely an error)."""
    from cleanlab.multilabel_classification.rank import get_label_quality_scores_per_class

    from mlray.audit.suspicion import LabelStats, calibrate

    out = {"mlray": calibrate(LabelStats.of(s, y), min_positives).suspicion(s, y)}
    out["|y - p|"] = np.abs(y - s)
    t = np.array([s[y[:, j] == 1, j].mean() if y[:, j].any() else 0.5 for j in range(y.shape[1])])
    out["confident learning (p / t)"] = np.where(y == 1, 1 - s / t, s / t)
    labels = [list(np.flatnonzero(row)) for row in y]
    for method in ("self_confidence", "normalized_margin"):
        for adjust in (False, True):
            q = get_label_quality_scores_per_class(labels, s.astype(np.float64), method=method,
                                                   adjust_pred_probs=adjust)
            q = np.asarray(q)  # (N, C) in cleanlab 2.x
            out[f"cleanlab {method}{' adjusted' if adjust else ''}"] = 1 - (q if q.shape == s.shape else q.T)
    return out


def ranking_metrics(sus: np.ndarray, y: np.ndarray, missing: np.ndarray, wrong: np.ndarray) -> dict:
    from mlray.evaluation.metrics import average_precision_per_label

    out = {}
    for kind, obs, truth in (("missing", 0, missing), ("wrong", 1, wrong)):
        sel = y == obs
        v, t = sus[sel], truth[sel]
        n = int(t.sum())
        out[f"{kind}_AUPRC"] = float(average_precision_per_label(v[:, None], t[:, None])[0])
        top = np.argsort(-v, kind="stable")[:n]
        out[f"{kind}_P@N"] = float(t[top].mean()) if n else float("nan")
        out[f"{kind}_N"] = n
    truth = missing | wrong
    out["all_AUPRC"] = float(average_precision_per_label(sus.reshape(-1, 1), truth.reshape(-1, 1))[0])
    return out


# ---------------------------------------------------------------------------- the loop


def head_test_map(run: str, emb: str, clean: str) -> float:
    """Test mAP on the clean labels of a head run (scored from the stored embeddings,
    which its backbone made: the same scores ``evaluate`` would give)."""
    from mlray.evaluation.metrics import average_precision_per_label
    from mlray.io.manifest import multi_hot, read_manifest
    from mlray.io.tagged import lookup_embeddings, out_files
    from mlray.model import rundir

    table, vocab = read_manifest(clean)
    test = table.filter(pc.equal(table.column("split"), "test"))
    e, have = lookup_embeddings(out_files(emb).files, test.column("image_id").combine_chunks(), 1280)
    w = rundir.load_weights(rundir.scoring_weights(run))
    wk = [k for k, v in w.items() if v.ndim == 2 and v.shape[0] == len(vocab)][-1]
    weight, bias = w[wk].float().numpy(), w[wk.replace("weight", "bias")].float().numpy()
    scores = 1 / (1 + np.exp(-(e[have] @ weight.T + bias)))
    ap = average_precision_per_label(scores, multi_hot(test.column("labels"), vocab)[have])
    return float(np.nanmean(ap))


def fixes_from_ranking(sus: np.ndarray, y: np.ndarray, truth: np.ndarray, ids: list[str], vocab: list[str],
                       n: int, dest: str) -> dict:
    """fixes.csv of the top ``n`` pairs, kept where a reviewer (the clean labels) agrees."""
    from mlray.data.fixes import write_fixes

    flat = np.argsort(-sus.reshape(-1), kind="stable")[:n]
    r, c = np.unravel_index(flat, sus.shape)
    keep = truth[r, c].astype(np.int8)
    obs = y[r, c].astype(np.int64)
    write_fixes(dest, pa.table({
        "keep": keep, "image_id": [ids[i] for i in r], "label": [vocab[j] for j in c], "observed": obs,
        "suggested": 1 - obs, "kind": ["missing" if o == 0 else "wrong" for o in obs],
        "score": np.zeros(len(r), np.float32), "suspicion": sus[r, c], "split": [None] * len(r),
        "uri": [None] * len(r),
    }))
    return {"reviewed": int(n), "kept": int(keep.sum())}


def full_train_map(manifest: str, clean: str, args, name: str) -> float:
    """``mlray train`` (defaults, ``--epochs``) on ``manifest``, test mAP on ``clean``'s labels."""
    from mlray.config import build_config
    from mlray.evaluation.report import evaluate
    from mlray.training.trainer import train

    cfg = build_config({"data": {"manifest": manifest, "image_size": args.size}, "optim": {"epochs": args.epochs},
                        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
                        "run": {"storage_path": os.path.join(os.path.abspath(OUT), "runs"), "name": name}})
    run = train(cfg).run_dir
    return float(evaluate(run, clean, "test", compare_strategies=False)["metrics"]["mAP"])


def run_set(name: str, args) -> list[dict]:
    from benchmarks.common import cached_run
    from benchmarks.quality import keywords_manifest, scenes_manifest
    from mlray.audit.job import AuditOptions, audit
    from mlray.data.fixes import apply_fixes
    from mlray.io.manifest import read_vocab
    from mlray.tagging.job import TagOptions, tag
    from mlray.training.head import HeadOptions, train_head

    clean = {"keywords": keywords_manifest, "scenes": scenes_manifest}[name]()
    run = cached_run(f"head-source-{name}-{args.size}", clean, args.size, epochs=1, freeze_epochs=1)
    root = os.path.join(os.path.abspath(OUT), f"audit-{name}")
    emb = os.path.join(root, "embeddings")
    if not os.path.exists(os.path.join(emb, "_summary.json")):
        tag(run, clean, emb, TagOptions(embeddings=True))
    noisy, y_clean, missing, wrong, ids = noisy_manifest(clean, args.noise_seed, os.path.join(root, "noisy"))
    vocab = read_vocab(clean)
    y = ((y_clean == 1) & ~missing | wrong).astype(np.uint8)
    out = os.path.join(root, "audit")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    res = audit(noisy, run, out, emb, AuditOptions(seed=args.noise_seed))
    audit_s = time.time() - t0
    print(res.format(), flush=True)
    s = oof_scores(out, len(ids), len(vocab))
    sus = rankings(s, y, AuditOptions().min_positives)
    rows = []
    for method, v in sus.items():
        m = ranking_metrics(v, y, missing, wrong)
        rows.append({"set": name, "method": method, **m})
        print(rows[-1], flush=True)
    # the audit's own ranking is the function's: same pairs on top
    top = pq.read_table(os.path.join(out, "suspects.parquet")).slice(0, 50).to_pylist()
    index = {i: k for k, i in enumerate(ids)}
    for r in top:
        j = vocab.index(r["label"])
        assert abs(sus["mlray"][index[r["image_id"]], j] - r["suspicion"]) < 1e-5, r

    # the loop: top N reviewed, fixes applied, heads (and trains) on noisy / audited / clean labels
    n = int(missing.sum() + wrong.sum())
    fixes = os.path.join(root, "fixes-reviewed.csv")
    review = fixes_from_ranking(sus["mlray"], y, missing | wrong, ids, vocab, n, fixes)
    audited = os.path.join(root, "audited")
    shutil.rmtree(audited, ignore_errors=True)
    apply_fixes(noisy, fixes, audited)
    loop = {"set": name, "injected": n, **review, "audit_s": audit_s, "flagged": res.flagged}
    for label, manifest in (("noisy", noisy), ("audited", audited), ("clean", clean)):
        head_dir = os.path.join(root, "runs", f"head-{label}")
        shutil.rmtree(head_dir, ignore_errors=True)
        train_head(run, emb, manifest, head_dir, HeadOptions(seed=0))
        loop[f"head_{label}"] = head_test_map(head_dir, emb, clean)
        print(label, loop[f"head_{label}"], flush=True)
    if args.train is not None and (not args.train or name in args.train):
        for label, manifest in (("noisy", noisy), ("audited", audited), ("clean", clean)):
            loop[f"train_{label}"] = full_train_map(manifest, clean, args, f"audit-{name}-{label}-{int(time.time())}")
            print("train", label, loop[f"train_{label}"], flush=True)
    for kind in ("head", "train"):
        if f"{kind}_noisy" in loop:
            lost = loop[f"{kind}_clean"] - loop[f"{kind}_noisy"]
            loop[f"{kind}_closed"] = (loop[f"{kind}_audited"] - loop[f"{kind}_noisy"]) / lost if lost > 0 else None
    rows.append({"set": name, "method": "loop", **loop})
    print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------- scale


def _synthetic(n: int, run: str, root: str, seed: int = 0) -> tuple[str, str]:
    """A tag output of ``n`` synthetic embeddings (the run's backbone digest, so the
    audit accepts them) and a manifest of their noisy labels."""
    from mlray.io.manifest import ManifestWriter
    from mlray.io.tagged import PARQUET_OPTIONS, score_schema
    from mlray.model.predictor import Predictor

    emb, manifest = os.path.join(root, "embeddings"), os.path.join(root, "manifest")
    if os.path.exists(os.path.join(manifest, "_stats.json")):
        return emb, manifest
    shutil.rmtree(root, ignore_errors=True)
    p = Predictor.load(run, "cpu", fuse=False)
    info = {"model": p.art.model_id, "dim": p.embedding_dim, "backbone_digest": p.backbone_digest}
    dim, c, part = p.embedding_dim, 20, 20_000
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=(64, c)).astype(np.float32)
    vocab = [f"label{j:02d}" for j in range(c)]
    schema = score_schema(vocab, info)
    writer = ManifestWriter(manifest, vocab)
    for k, start in enumerate(range(0, n, part)):
        m = min(part, n - start)
        e = rng.normal(size=(m, dim)).astype(np.float16)
        z = e[:, :64].astype(np.float32) @ w_true / 8.0 + rng.normal(scale=0.5, size=(m, c))
        y = (z > 1.6).astype(np.uint8)  # ~5% positives per label
        noisy, _, _ = inject_noise(y, seed + k)
        ids = [f"img{start + i:08d}.jpg" for i in range(m)]
        offsets = np.arange(0, m * dim + 1, dim, dtype=np.int32)
        t = pa.table({
            "image_id": ids, "uri": [f"/nonexistent/{i}" for i in ids],
            "scores": pa.nulls(m, pa.list_(pa.float32())), "labels": pa.nulls(m, pa.list_(pa.string())),
            "model": [info["model"]] * m, "error": pa.nulls(m, pa.string()),
            "embedding": pa.ListArray.from_arrays(pa.array(offsets), pa.array(e.reshape(-1), pa.float16())),
        }, schema=schema)
        os.makedirs(emb, exist_ok=True)
        pq.write_table(t, os.path.join(emb, f"part-{k:05d}.parquet"), **PARQUET_OPTIONS)
        lab = [[vocab[j] for j in np.flatnonzero(row)] for row in noisy]
        writer.write(pa.table({"image_id": ids, "uri": [f"/nonexistent/{i}" for i in ids],
                               "labels": pa.array(lab, pa.list_(pa.string())), "split": ["train"] * m,
                               "content_hash": [f"h{start + i}" for i in range(m)]}))
    writer.close({"synthetic": n})
    return emb, manifest


def scale_case(n: int, run: str, root: str, epochs: int, patience: int) -> dict:
    """One timed audit of ``n`` synthetic stored embeddings (run in a fresh process)."""
    import resource

    from benchmarks.common import tree_pss
    from mlray.audit.job import AuditOptions, audit

    emb, manifest = _synthetic(n, run, root)
    peak = {"pss": 0}
    done = threading.Event()

    def sample():
        while not done.wait(1.0):
            peak["pss"] = max(peak["pss"], tree_pss(os.getpid()))

    threading.Thread(target=sample, daemon=True).start()
    out = os.path.join(root, "audit")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    res = audit(manifest, run, out, emb, AuditOptions(epochs=epochs, patience=patience))
    seconds = time.time() - t0
    done.set()
    return {"rows": n, "seconds": seconds, "timings": res.timings, "candidates": res.candidates,
            "flagged": res.flagged, "folds": res.folds,
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tree_peak_pss_mb": peak["pss"] / 2**20}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="+", default=["keywords", "scenes"])
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the full trains (--train)")
    ap.add_argument("--train", nargs="*", metavar="SET",
                    help="also a full `mlray train` on noisy, audited and clean labels, on these sets (none named: all)")
    ap.add_argument("--scale", type=int, help="time an audit of this many synthetic stored embeddings instead")
    ap.add_argument("--scale-epochs", type=int, default=10)
    ap.add_argument("--scale-patience", type=int, default=3)
    ap.add_argument("--model", help="--scale: the run whose backbone digest the synthetic embeddings carry "
                    "(default: the keywords source run, trained once)")
    args = ap.parse_args(argv)
    from mlray.runtime import init_ray

    if args.scale:
        from benchmarks.common import cached_run, in_fresh_process
        from benchmarks.quality import keywords_manifest

        run = args.model or cached_run(f"head-source-keywords-{args.size}", keywords_manifest(), args.size,
                                       epochs=1, freeze_epochs=1)
        root = os.path.join(os.path.abspath(OUT), f"audit-scale-{args.scale}")
        doc = in_fresh_process("benchmarks.audit", "scale_case", args.scale, run, root, args.scale_epochs,
                               args.scale_patience)
        print(json.dumps(doc, indent=1))
        record(f"audit_scale_{args.scale}", [doc])
        return [doc]
    init_ray()
    rows = []
    for name in args.sets:
        rows += run_set(name, args)
    record(f"audit_seed{args.noise_seed}{'_train' if args.train is not None else ''}", rows)
    table = [[r["set"], r["method"], r["missing_AUPRC"], r["missing_P@N"], r["wrong_AUPRC"], r["wrong_P@N"],
              r["all_AUPRC"]] for r in rows if r["method"] != "loop"]
    print(fmt_table(["set", "ranking", "missing AUPRC", "missing P@N", "wrong AUPRC", "wrong P@N", "all AUPRC"],
                    table))
    loops = [r for r in rows if r["method"] == "loop"]
    print(fmt_table(["set", "injected", "kept of top N", "head noisy", "head audited", "head clean", "closed",
                     "train noisy", "train audited", "train clean", "closed"],
                    [[r["set"], r["injected"], r["kept"], r["head_noisy"], r["head_audited"], r["head_clean"],
                      r.get("head_closed"), r.get("train_noisy", ""), r.get("train_audited", ""),
                      r.get("train_clean", ""), r.get("train_closed", "")] for r in loops]))
    return rows


if __name__ == "__main__":
    main()

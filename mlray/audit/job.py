"""``mlray audit``: the label errors of a manifest, ranked, with a report and a fixes file.

    mlray audit --manifest M --model RUN --out DIR [--embeddings TAGS_OUT] [--folds 5]

    checks (options, labels, model, backbone) -> folds over content-hash groups
      -> embeddings: TAGS_OUT's where present, the rest computed from the images
         with RUN's backbone (``mlray tag --embeddings`` into DIR/embeddings)
      -> K heads (``training.head.fit_head``), one per fold, each fitted on the
         other folds and stopped early on a held-out share of their images
      -> every image scored by its own fold's head: out-of-fold scores (DIR/scores)
      -> per-label calibration (``suspicion``) -> candidate pairs, merged into one
         ranking in bounded memory -> DIR/suspects.parquet, fixes.csv, report.html

Early stopping uses an inner split of the training folds, not the manifest's val
split: val images are audited too, and a head selected on their labels would
have seen them. The driver holds ids, labels and folds; embeddings stay in the
parts and the object store (Ray tasks, ``mlray.audit.work``), and each head is
fitted on at most ``--max-fit-rows`` images (a seeded sample beyond that; every
image is still scored).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlray.audit import work
from mlray.audit.folds import assign_folds, content_groups, rarest_label
from mlray.audit.suspicion import MISSING, WRONG, LabelStats, calibrate
from mlray.config import check_options, option
from mlray.data.fixes import FIXES_COLUMNS, write_fixes
from mlray.io import storage
from mlray.io.manifest import ManifestError, ManifestWriter, absolute_uris, manifest_base, manifest_files, read_manifest
from mlray.io.tagged import check_backbone, embedding_parts, out_files

SUSPECTS, REPORT, FIXES, SCORES, EMBEDDINGS, SUMMARY = (
    "suspects.parquet", "report.html", "fixes.csv", "scores", "embeddings", "audit.json")
WORK = "_work"  # scratch under DIR, removed at the end
MERGE_ROWS = 1_000_000  # most candidate pairs the ranking merge sorts at once (one suspicion range)


@dataclass
class AuditOptions:
    """``mlray audit``'s options: defaults, flags, help and ranges in one place (the CLI reads them)."""

    folds: int = option(5, "cross-validation folds: each image is scored by a head fitted on the other folds",
                        low=2, integer=True)
    cut: float = option(0.5, "suspicion at or above which a pair is flagged (the estimated probability "
                        "that the label as it stands is an error)", low=0)
    floor: float = option(0.01, "lowest suspicion a pair needs to be listed in the ranking", low=0)
    min_positives: int = option(5, "labels with fewer labelled positives (or negatives) are not audited "
                                "(listed in the report)", low=1, integer=True)
    stop_fraction: float = option(0.1, "share of the training folds' images held out to stop each head early",
                                  low=0.01)
    max_fit_rows: int = option(250_000, "most images a fold's head is fitted on (a seeded sample beyond; every "
                               "image is still scored)", low=100, integer=True)
    epochs: int = option(300, "most passes of each fold's head (early stop ends it sooner)", low=1, integer=True)
    patience: int = option(30, "passes without a gain on the held-out share before a head stops", low=1,
                           integer=True)
    lr: float = option(1e-3, "AdamW learning rate of the heads", low=0)
    weight_decay: float = option(1e-4, "AdamW weight decay of the heads", low=0)
    batch_size: int = option(256, "embeddings per step", low=1, integer=True)
    seed: int = option(0, "seed of the folds, the samples and the heads", integer=True, low=0)
    num_gpus: float = option(0.0, "GPUs per fold's head fit (fractions share a GPU); 0 fits on CPUs", low=0)
    top: int = option(12, "suspects per label and kind shown with thumbnails in report.html", low=1, integer=True)
    overrides: list[str] = option([], "key=value for the heads' config (loss.*)", cli=False)


@dataclass
class AuditResult:
    out: str
    rows: int  # manifest rows
    audited: int  # rows with an embedding: scored out of fold
    from_embeddings: int  # of those, embeddings read from TAGS_OUT (or DIR/embeddings of an earlier run)
    computed: int  # embedded from their images now
    unreadable: list  # (image_id, error): rows left out, no embedding could be made
    labels_audited: int
    labels_skipped: list  # labels with too few positives or negatives to judge
    candidates: int
    flagged: dict  # kind -> flagged pairs
    folds: list  # per fold: rows, best pass, held-out mAP
    rho: float
    phi: float
    seconds: float
    timings: dict = field(default_factory=dict)

    def format(self) -> str:
        lines = [
            f"images: {self.rows} in the manifest, {self.audited} audited ({self.from_embeddings} embeddings read, "
            f"{self.computed} computed from images now), {len(self.unreadable)} unreadable (left out)",
            f"labels: {self.labels_audited} audited" + (
                f", {len(self.labels_skipped)} with too few positives or negatives to judge: "
                + ", ".join(self.labels_skipped[:10]) + (" ..." if len(self.labels_skipped) > 10 else "")
                if self.labels_skipped else ""),
            "folds: " + "; ".join(f"{f['fold']}: {f['train_rows']} rows, pass {f['best_epoch']}, held-out mAP "
                                  f"{f['val_mAP']:.3f}" for f in self.folds),
            f"estimated: {self.rho:.1%} of positives forgotten, {self.phi:.1%} tagged on the wrong image",
            f"ranking: {self.candidates} pairs; flagged {self.flagged.get(MISSING, 0)} missing and "
            f"{self.flagged.get(WRONG, 0)} wrong labels",
            f"report: {storage.join(self.out, REPORT)}   fixes: {storage.join(self.out, FIXES)} "
            f"({self.seconds:.1f} s)",
        ]
        lines += [f"unreadable {i}: {e}" for i, e in self.unreadable[:10]]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- checks


def check_audit_options(opts: AuditOptions) -> None:
    check_options(opts)
    if not 0 < opts.cut <= 1:
        raise ValueError(f"--cut {opts.cut}: must be in (0, 1] (an estimated probability of an error)")
    if not opts.floor <= opts.cut:
        raise ValueError(f"--floor {opts.floor}: must not exceed --cut {opts.cut}")
    if opts.stop_fraction >= 0.5:
        raise ValueError(f"--stop-fraction {opts.stop_fraction}: must be below 0.5 (the rest fits the heads)")


def labelled_manifest(manifest: str) -> tuple[pa.Table, list[str]]:
    """The manifest's rows (no image bytes) and vocabulary; refuses one without labels to judge."""
    from mlray.io.manifest import first_schema

    if "labels" not in first_schema(manifest).names:
        raise ManifestError(f"{manifest}: no 'labels' column; an audit checks labels: prepare the manifest from "
                            "a label file (`mlray prepare`)")
    table, vocab = read_manifest(manifest)
    if not vocab:
        raise ManifestError(f"{manifest}: its vocabulary (schema metadata mlray.labels) is empty: nothing to audit")
    if pc.sum(pc.list_value_length(table.column("labels"))).as_py() in (0, None):
        raise ManifestError(f"{manifest}: none of its {table.num_rows} images has a positive label: nothing to "
                            "audit; check the label file it was prepared from")
    return table, vocab


def _model(model: str, overrides: list[str]):
    """The run's config with the overrides (the heads' loss), and its backbone's digest and width."""
    from mlray.config import build_config
    from mlray.model.predictor import Predictor
    from mlray.model.rundir import load_artifacts

    try:
        art = load_artifacts(model)
    except FileNotFoundError as e:
        raise ValueError(f"--model {e}") from e
    cfg = build_config(art.config.model_dump(mode="json"), list(overrides), source=f"--model {model}")
    predictor = Predictor(art, device="cpu", fuse=False)
    return cfg, predictor.backbone_digest, predictor.embedding_dim


# ---------------------------------------------------------------------------- where each embedding is


@dataclass
class _Located:
    """For each embedding part, the manifest row of each of its rows (-1: another
    part holds it, or an error row, or not in the manifest)."""

    ids: pa.Array
    owner: np.ndarray  # (N,) part number holding the row's embedding, -1 none
    parts: list[str] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)  # manifest row -> error of a tag output's error row

    def add(self, files: list[str]) -> int:
        """Locate the manifest's rows in ``files`` (first part by name wins); returns rows found."""
        def read(uri: str) -> pa.Table:
            return storage.read_table(uri, columns=["image_id", "error"])

        found = 0
        with ThreadPoolExecutor(8) as pool:
            for uri, t in zip(files, pool.map(read, files)):
                rows = pc.fill_null(pc.index_in(t.column("image_id"), value_set=self.ids), -1).to_numpy()
                rows = rows.astype(np.int64)
                err = t.column("error").to_numpy(zero_copy_only=False)
                scored = np.array([e is None for e in err], bool)
                for r, e in zip(rows[(rows >= 0) & ~scored], err[(rows >= 0) & ~scored]):
                    self.errors.setdefault(int(r), e)
                mine = (rows >= 0) & scored
                mine[mine] = self.owner[rows[mine]] < 0
                if not mine.any():
                    continue
                part = len(self.parts)
                self.owner[rows[mine]] = part
                self.parts.append(uri)
                self.rows.append(np.where(mine, rows, -1))
                found += int(mine.sum())
        return found


def _missing_manifest(manifest: str, table: pa.Table, todo: np.ndarray, where: str) -> str:
    """A manifest of the rows to embed (with their image bytes when packed), for ``tag``."""
    from mlray.io.manifest import read_vocab

    ids = table.column("image_id").combine_chunks().filter(pa.array(todo))
    writer = ManifestWriter(where, read_vocab(manifest))
    base = manifest_base(manifest)
    try:
        for f in manifest_files(manifest):
            t = storage.read_table(f).replace_schema_metadata(None)
            t = t.filter(pc.is_in(t.column("image_id"), value_set=ids))
            if t.num_rows:
                writer.write(absolute_uris(t, base))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return where


def _embed(model: str, manifest: str, table: pa.Table, todo: np.ndarray, out: str) -> list[str]:
    """Embed the rows ``todo`` from their images with RUN's backbone (``mlray tag
    --embeddings``, a Ray Data pipeline) into DIR/embeddings; its parts."""
    from mlray.tagging.job import TagOptions, tag

    emb = storage.join(out, EMBEDDINGS)
    source = manifest if todo.all() else _missing_manifest(manifest, table, todo, storage.join(out, WORK, "missing"))
    print(f"{int(todo.sum())} images have no stored embedding: embedding them from their images into {emb}",
          flush=True)
    summary = tag(model, source, emb, TagOptions(embeddings=True, incremental=True))
    print(summary.format(), flush=True)
    return out_files(emb).files


# ---------------------------------------------------------------------------- the job


def audit(manifest: str, model: str, out: str, embeddings: str | None = None,
          opts: AuditOptions | None = None) -> AuditResult:
    """Rank the label errors of ``manifest`` (out-of-fold heads on ``model``'s
    backbone embeddings) and write DIR = ``out``: suspects.parquet, report.html,
    fixes.csv, scores/ (out-of-fold scores), audit.json, and embeddings/ when
    some had to be computed from images."""
    import ray

    from mlray.runtime import init_ray, worker_runtime_env
    from mlray.training.head import HeadOptions

    opts = opts or AuditOptions()
    check_audit_options(opts)
    t0 = time.time()
    timings: dict[str, float] = {}
    table, vocab = labelled_manifest(manifest)
    ids = table.column("image_id").combine_chunks()
    labels = table.column("labels").combine_chunks()
    n = len(ids)
    groups = content_groups(ids, table.column("content_hash") if "content_hash" in table.column_names else None)
    folds = assign_folds(groups, opts.folds, seed=opts.seed, rarity=rarest_label(labels, vocab))
    cfg, digest, dim = _model(model, opts.overrides)
    parts: list[str] = []
    if embeddings:
        state, info = embedding_parts(embeddings)
        check_backbone(info, digest, dim, embeddings, model)
        parts = state.files

    loc = _Located(ids, np.full(n, -1, np.int64))
    from_embeddings = loc.add(parts) if parts else 0
    computed = 0
    if (loc.owner < 0).any():
        own = storage.join(out, EMBEDDINGS)
        if storage.exists(own) and out_files(own).files:  # an earlier audit into DIR embedded some
            from_embeddings += loc.add(out_files(own).files)
        todo = loc.owner < 0
        if todo.any():
            t = time.time()
            computed = loc.add(_embed(model, manifest, table, todo, out))
            timings["embed_s"] = time.time() - t
    have = loc.owner >= 0
    unreadable = [(ids[int(r)].as_py(), loc.errors.get(int(r), "no embedding")) for r in np.flatnonzero(~have)]
    if have.sum() < opts.folds:
        raise ValueError(f"{manifest}: only {int(have.sum())} images could be embedded; an audit with --folds "
                         f"{opts.folds} needs at least as many")

    rng = np.random.default_rng(opts.seed)
    stop = (rng.random(int(groups.max()) + 1) < opts.stop_fraction)[groups]
    n_have = int(have.sum())
    rate = opts.max_fit_rows * opts.folds / ((opts.folds - 1) * n_have)
    sampled = have & (rng.random(n) < rate) if rate < 1 else have

    init_ray()
    env = worker_runtime_env()
    task = ray.remote(num_cpus=1, runtime_env=env)
    refs = {k: ray.put(v) for k, v in (("folds", folds), ("stop", stop), ("labels", labels), ("ids", ids),
                                        ("sampled", sampled))}
    t = time.time()
    samples = [task(work.sample_part).remote(p, r, refs["sampled"]) for p, r in zip(loc.parts, loc.rows)]
    head_opts = HeadOptions(epochs=opts.epochs, patience=opts.patience, lr=opts.lr, weight_decay=opts.weight_decay,
                            batch_size=opts.batch_size, seed=opts.seed, device="cuda" if opts.num_gpus else "cpu")
    fit = ray.remote(num_cpus=1, num_gpus=opts.num_gpus or None, runtime_env=env)(work.fit_fold)
    print(f"fitting {opts.folds} heads on {int(sampled.sum())} images' embeddings", flush=True)
    heads = ray.get([fit.remote(k, refs["folds"], refs["stop"], refs["labels"], vocab, cfg, head_opts, 1, *samples)
                     for k in range(opts.folds)])
    del samples
    timings["fit_s"] = time.time() - t

    t = time.time()
    scores_dir = storage.join(out, SCORES)
    _clear(scores_dir)
    heads_ref = ray.put(heads)
    stats = LabelStats.empty(len(vocab))
    score_files = []
    # summed as they come: the driver holds one part's histograms at a time, whatever the corpus
    for r in _as_completed([task(work.score_part).remote(p, r, heads_ref, refs["folds"], refs["ids"], refs["labels"],
                                                         vocab, storage.join(scores_dir, f"part-{i:05d}.parquet"))
                            for i, (p, r) in enumerate(zip(loc.parts, loc.rows))]):
        stats = stats + r["stats"]
        if r["file"]:
            score_files.append(r["file"])
    cal = calibrate(stats, opts.min_positives)
    timings["score_s"] = time.time() - t

    t = time.time()
    work_dir = storage.join(out, WORK, "candidates")
    cal_ref = ray.put(cal)
    cands = list(_as_completed([task(work.candidate_part).remote(f, cal_ref, refs["labels"], vocab, opts.floor,
                                                                 opts.cut, storage.join(work_dir, f"part-{i:05d}.parquet"))
                                for i, f in enumerate(sorted(score_files))]))
    counts = {k: sum(c["counts"][k] for c in cands) for k in cands[0]["counts"]} if cands else {}
    hist = sum(c["hist"] for c in cands) if cands else np.zeros(work.SUSPICION_BINS, np.int64)
    n_flagged = int(sum(counts[f"{k}_flagged"].sum() for k in (MISSING, WRONG))) if counts else 0
    # fixes.csv: every flagged pair, then as many of the next (at least 100) for a reviewer to look at too
    ranked = _merge([c["file"] for c in cands], hist, table, vocab, storage.join(out, SUSPECTS), opts,
                    fix_rows=max(2 * n_flagged, 100))
    timings["rank_s"] = time.time() - t

    t = time.time()
    per_label = _per_label(vocab, stats, cal, counts)
    fold_info = [{k: h[k] for k in ("fold", "train_rows", "stop_rows", "best_epoch", "epochs", "val_mAP")}
                 for h in heads]
    result = AuditResult(
        out=out, rows=n, audited=n_have, from_embeddings=from_embeddings, computed=computed, unreadable=unreadable,
        labels_audited=int(cal.audited.sum()), labels_skipped=[v for v, a in zip(vocab, cal.audited) if not a],
        candidates=ranked["rows"], flagged=ranked["flagged"], folds=fold_info, rho=cal.rho, phi=cal.phi,
        seconds=0.0, timings=timings,
    )
    write_fixes(storage.join(out, FIXES), ranked["fixes"])
    from mlray.audit.report import write_report

    write_report(storage.join(out, REPORT), manifest, result, per_label, ranked["top"], opts)
    timings["report_s"] = time.time() - t
    _clear(storage.join(out, WORK))
    result.seconds = time.time() - t0
    storage.write_text(storage.join(out, SUMMARY), json.dumps({
        "manifest": manifest, "model": model, "embeddings": embeddings, "options": asdict(opts),
        **{k: v for k, v in asdict(result).items() if k != "unreadable"},
        "unreadable": [{"image_id": i, "error": e} for i, e in unreadable], "per_label": per_label,
    }, indent=1, default=float))
    return result


def _as_completed(refs: list):
    """The results of Ray tasks, one at a time as each finishes."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def _clear(uri: str) -> None:
    """Remove the files under ``uri`` (a directory this job owns)."""
    if storage.exists(uri):
        for f in storage.list_files(uri, skip_hidden=False):
            storage.delete(f)
        if not storage.is_remote(uri):
            for root, dirs, _ in os.walk(storage.resolve(uri)[1], topdown=False):
                for d in dirs:
                    os.rmdir(os.path.join(root, d))
                if root == storage.resolve(uri)[1]:
                    os.rmdir(root)


def _per_label(vocab: list[str], stats: LabelStats, cal, counts: dict) -> list[dict]:
    out = []
    zero = np.zeros(len(vocab), np.int64)
    n_pos, n_neg = stats.n_pos, stats.n_neg
    for j, v in enumerate(vocab):
        out.append({
            "label": v, "positives": int(n_pos[j]), "negatives": int(n_neg[j]), "audited": bool(cal.audited[j]),
            "est_missing": float(cal.est_missing[j]), "est_wrong": float(cal.est_wrong[j]),
            "missing": int(counts.get(MISSING, zero)[j]), "wrong": int(counts.get(WRONG, zero)[j]),
            "missing_flagged": int(counts.get(f"{MISSING}_flagged", zero)[j]),
            "wrong_flagged": int(counts.get(f"{WRONG}_flagged", zero)[j]),
        })
    return out


# ---------------------------------------------------------------------------- the ranking, in bounded memory


def _ranges(hist: np.ndarray, limit: int) -> list[tuple[float, float | None]]:
    """Suspicion ranges, highest first, each holding at most ``limit`` pairs (a
    single bin may hold more): (low, high) with high None for the top one."""
    bins = len(hist)
    out: list[tuple[float, float | None]] = []
    hi_bin, held = bins, 0
    for b in range(bins - 1, -1, -1):
        if held and held + hist[b] > limit:
            out.append((b + 1, hi_bin))
            hi_bin, held = b + 1, 0
        held += int(hist[b])
    if held:
        out.append((0, hi_bin))
    return [(lo / bins if lo else 0.0, None if hi == bins else hi / bins) for lo, hi in out]


def _merge(files: list[str], hist: np.ndarray, table: pa.Table, vocab: list[str], dest: str, opts: AuditOptions,
           fix_rows: int) -> dict:
    """Merge the sorted candidate parts into one ranking at ``dest``, a range of
    suspicions at a time (``MERGE_ROWS`` pairs at most, whatever the corpus size);
    keep the top rows per label and kind for the report, and the first
    ``fix_rows`` rows for fixes.csv."""
    ids = table.column("image_id").combine_chunks()
    uris = table.column("uri").combine_chunks()
    splits = table.column("split").combine_chunks() if "split" in table.column_names else pa.nulls(len(ids), pa.string())
    vocab_arr = pa.array(vocab, pa.string())
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("split", pa.string()),
                        ("label", pa.string()), ("kind", pa.string()), ("observed", pa.int8()),
                        ("score", pa.float32()), ("suspicion", pa.float32()), ("flagged", pa.bool_())])
    top: dict[tuple[str, str], list[dict]] = {}
    fixes: list[pa.Table] = []
    flagged = {MISSING: 0, WRONG: 0}
    written = 0
    with storage.atomic_local_file(dest, ".parquet") as tmp:
        writer = pq.ParquetWriter(tmp, schema, compression="zstd")
        for lo, hi in _ranges(hist, MERGE_ROWS):
            filters = [("suspicion", ">=", lo)] + ([("suspicion", "<", hi)] if hi is not None else [])
            got = [pq.read_table(storage.resolve(f)[1], filesystem=storage.resolve(f)[0], filters=filters)
                   for f in files]
            t = pa.concat_tables(got) if got else None
            if t is None or not t.num_rows:
                continue
            t = t.sort_by([("suspicion", "descending"), ("label_index", "ascending"), ("row", "ascending")])
            rows = t.column("row")
            observed = t.column("observed")
            kind = pc.if_else(pc.equal(observed, 0), MISSING, WRONG)
            flag = pc.greater_equal(t.column("suspicion"), pa.scalar(opts.cut, pa.float32()))
            out = pa.table({
                "image_id": ids.take(rows), "uri": uris.take(rows), "split": splits.take(rows),
                "label": vocab_arr.take(t.column("label_index")), "kind": kind, "observed": observed,
                "score": t.column("score"), "suspicion": t.column("suspicion"), "flagged": flag,
            }, schema=schema)
            writer.write_table(out, row_group_size=128_000)
            for k in (MISSING, WRONG):
                flagged[k] += int(pc.sum(pc.and_(flag, pc.equal(kind, k))).as_py() or 0)
            _keep_top(top, out, opts.top)
            if written < fix_rows:
                fixes.append(out.slice(0, fix_rows - written))
            written += out.num_rows
        writer.close()
    chosen = pa.concat_tables(fixes) if fixes else schema.empty_table()
    observed = chosen.column("observed").cast(pa.int64())
    fix_table = pa.table({
        "keep": chosen.column("flagged").cast(pa.int8()), "image_id": chosen.column("image_id"),
        "label": chosen.column("label"), "observed": observed, "suggested": pc.subtract(1, observed),
        "kind": chosen.column("kind"), "score": chosen.column("score"),
        "suspicion": chosen.column("suspicion"), "split": chosen.column("split"), "uri": chosen.column("uri"),
    }).select(list(FIXES_COLUMNS))
    return {"rows": written, "flagged": flagged, "top": top, "fixes": fix_table}


def _keep_top(top: dict, chunk: pa.Table, k: int) -> None:
    """Add a chunk's first rows per (label, kind) to ``top`` until each holds ``k``
    (chunks arrive highest suspicion first)."""
    held = {key: len(v) for key, v in top.items()}
    wanted = []
    for i, key in enumerate(zip(chunk.column("label").to_pylist(), chunk.column("kind").to_pylist())):
        if held.get(key, 0) < k:
            held[key] = held.get(key, 0) + 1
            wanted.append(i)
    for r in chunk.take(pa.array(wanted, pa.int64())).to_pylist():
        top.setdefault((r["label"], r["kind"]), []).append(r)

"""``mlray tag``: bulk inference over a corpus, scores and label sets to Parquet.

    mlray tag --model s3://bucket/runs/coco-001 --input s3://bucket/new/ --out s3://bucket/tags/

    checks (options, OUT, model, input) -> lease on OUT -> plan: OUT's ids joined
      with the input's in Ray tasks (``mlray.tag_plan``), duplicates repaired
      -> fetch (retried) + decode (CPU tasks) -> model in an actor pool (GPU:
      num_gpus=1 per actor, bf16/fp16 autocast) -> atomic Parquet parts -> ``_summary.json``

Exactly once: every input row ends up once in OUT. Each output file appears
atomically and is named by a digest of the ids it holds, so a retried write
task replaces its own file instead of adding a second one; a job killed halfway
and run again skips the ids OUT already has, and a job run again after it
finished has nothing to do. ``--incremental`` is the nightly mode: OUT may hold
finished runs of other inputs, and only new ids are tagged. One job writes an
OUT at a time (``mlray.lease``). Rows whose image could not be fetched for a
transient cause are not written; the job exits non-zero and the next run tags them.

Ray Data's ``CheckpointConfig`` was considered for this and not used: it deletes
its id log when a run succeeds (so it cannot drive ``--incremental``), it writes
that log separately from the output (a crash between the two re-tags rows), and
on local paths it needs a network file system. The output itself is the log here.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlray import storage, tag_plan
from mlray.data import RETRYABLE
from mlray.lease import Lease
from mlray.manifest import manifest_files

if TYPE_CHECKING:
    from mlray.inference import Predictor
    from mlray.rundir import RunArtifacts

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SUMMARY_FILE = "_summary.json"
MAX_LISTED_IDS = 1000  # retryable ids listed by name in _summary.json (all are counted)


class TagError(RuntimeError):
    """The tagging job cannot run, or finished with rows missing or duplicated."""


@dataclass
class TagOptions:
    batch_size: int = 64
    concurrency: int = 1
    num_gpus: float = 0.0
    actor_cpus: float | None = None
    threshold: float | None = None
    top_k: int | None = None
    incremental: bool = False
    rows_per_file: int = 20_000
    decode_batch_size: int = 128  # rows per decode task: 64 -> 128 took tagging from 284 to 335 images/s here
    fetch_concurrency: int = 16
    wait: float = 0.0  # seconds to wait for another job's lease on OUT (0: refuse at once)
    allow_model_change: bool = False  # add rows of another model / vocabulary to OUT on purpose
    retry_errors: bool = False  # tag again the rows whose error was missing: (the object was absent)
    lease_ttl: float = 120.0  # seconds a lease lives without renewal (renewed every third of it)
    embeddings: bool = False  # add the pooled features that feed the head (list<float16>) per scored row
    from_embeddings: bool = False  # the input is a tag OUT with embeddings: rescore them, read no image
    precision: str = "auto"  # scoring: auto (the run's mixed precision on a GPU, fp32 on CPU), fp32, bf16
    decode: str = "auto"  # cpu: in CPU tasks; device: in the scoring actor (nvJPEG on its GPU); auto: device (see device_decode.CPU_DEFAULT)


@dataclass
class TagSummary:
    rows_in: int
    rows_skipped: int
    rows_written: int
    rows_scored: int
    rows_with_errors: int
    errors_by_reason: dict[str, int]
    rows_in_out: int
    duplicates: int
    missing: int
    seconds: float
    images_per_s: float
    model: str
    out: str
    files_written: list[str] = field(default_factory=list)
    retryable: int = 0  # rows left out after transient fetch errors; the next run tags them
    retryable_ids: list[str] = field(default_factory=list)  # the first MAX_LISTED_IDS of them
    duplicates_repaired: int = 0  # extra rows of ids OUT held more than once, dropped before tagging
    errors_retried: int = 0  # missing: error rows tagged again (--retry-errors)
    plan_seconds: float = 0.0  # finding the new ids (and repairing OUT) before the first image is read

    def format(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.errors_by_reason.items())) or "none"
        extra = ""
        if self.retryable:
            extra += f"\nleft out for the next run (transient fetch errors): {self.retryable}"
        if self.duplicates_repaired:
            extra += f"\nrepaired: {self.duplicates_repaired} duplicate rows dropped from OUT"
        if self.errors_retried:
            extra += f"\nretried: {self.errors_retried} rows that were missing: errors"
        if not self.rows_written and not self.retryable:
            extra += "\nnothing to do: OUT already holds every input id"
        return (
            f"rows in: {self.rows_in}   already in OUT (skipped): {self.rows_skipped}   written now: {self.rows_written}\n"
            f"scored: {self.rows_scored}   errors: {self.rows_with_errors} ({reasons})\n"
            f"OUT holds {self.rows_in_out} rows; duplicates {self.duplicates}; input ids missing from OUT {self.missing}\n"
            f"{self.images_per_s:.1f} images/s over {self.seconds:.1f} s   model {self.model}   out {self.out}"
            + extra
        )


def _is_manifest(uri: str) -> bool:
    if uri.lower().endswith(".parquet"):
        return True
    if any(c in uri for c in "*?["):
        return False
    try:
        return storage.is_dir(uri) and bool(storage.list_files(uri, (".parquet",)))
    except storage.StorageError:
        return False


def _listing_base(uri: str) -> str:
    """The prefix of a glob before its first wildcard's path segment (``uri`` itself without one)."""
    if not any(c in uri for c in "*?["):
        return uri
    first = min(uri.index(c) for c in "*?[" if c in uri)
    return uri[:first].rsplit("/", 1)[0]


def list_images(uri: str) -> pa.Table:
    """``image_id, uri`` for the image files under a prefix, or matching a glob;
    ids are paths relative to the prefix (the part before any wildcard)."""
    base = _listing_base(uri)
    pattern = uri if base != uri else None
    files = [f for f in storage.list_files(base) if f.lower().endswith(IMAGE_SUFFIXES)]
    if pattern:
        files = [f for f in files if fnmatch.fnmatchcase(f, pattern)]
    if not files:
        raise TagError(f"--input {uri}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    prefix = base.rstrip("/") + "/"
    ids = [f[len(prefix):] if f.startswith(prefix) else posixpath.basename(f) for f in files]
    return pa.table({"image_id": pa.array(ids, pa.string()), "uri": pa.array(files, pa.string())})


# Dictionary encoding only where values repeat; floats byte-stream-split: reading
# a 20,000-row part with embeddings took 0.68 s with the defaults (a dictionary
# tried and abandoned per page, float16 decoded value by value), 0.15 s this way,
# and the part is 10% smaller.
PARQUET_OPTIONS = {
    "compression": "zstd",
    "use_dictionary": ["model", "error", "labels.list.element"],
    "use_byte_stream_split": ["scores.list.element", "embedding.list.element"],
}


def write_part(out: str, table: pa.Table) -> str:
    """Write rows to ``OUT/part-<digest of their ids>.parquet``, atomically; a
    retried write of the same rows replaces its own file instead of adding one."""
    ids = table.column("image_id").to_pylist()
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:24]
    uri = storage.join(out, f"part-{digest}.parquet")
    with storage.atomic_local_file(uri, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, **PARQUET_OPTIONS)
    return uri


def _retryable(errors: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.fill_null(pc.starts_with(errors, RETRYABLE + ":"), False)


class _AtomicParquetSink:
    """Writes each task's rows to one Parquet part (``write_part``). Rows whose
    fetch failed for a transient cause are not written: their ids come back
    for the summary, and the next run tags them."""

    def __new__(cls, out: str, schema: pa.Schema, rows_per_file: int | None):
        from ray.data import Datasink

        class AtomicParquetSink(Datasink):
            def __init__(self):
                self.result: dict = {"rows": 0, "errors": Counter(), "files": [], "retryable": 0, "retryable_ids": []}

            @property
            def min_rows_per_write(self) -> int | None:
                return rows_per_file

            def write(self, blocks, ctx) -> dict:
                tables = [pa.table(b) if not isinstance(b, pa.Table) else b for b in blocks]
                tables = [t for t in tables if t.num_rows]
                if not tables:
                    return {"rows": 0, "errors": {}, "file": None, "retryable_ids": []}
                table = pa.concat_tables(tables).select(schema.names).cast(schema)
                later = _retryable(table.column("error"))
                retry_ids = table.filter(later).column("image_id").to_pylist()
                table = table.filter(pc.invert(later))
                uri = write_part(out, table) if table.num_rows else None
                errors = Counter(e.split(":", 1)[0] for e in table.column("error").drop_null().to_pylist())
                return {"rows": table.num_rows, "errors": dict(errors), "file": uri, "retryable_ids": retry_ids}

            def on_write_complete(self, write_result) -> None:
                for r in write_result.write_returns:
                    self.result["rows"] += r["rows"]
                    self.result["errors"].update(r["errors"])
                    self.result["retryable"] += len(r["retryable_ids"])
                    room = MAX_LISTED_IDS - len(self.result["retryable_ids"])
                    self.result["retryable_ids"] += r["retryable_ids"][:max(room, 0)]
                    if r["file"]:
                        self.result["files"].append(r["file"])

        return AtomicParquetSink()


# --- checks before any work: each failure is one line naming the flag or path ---

_RANGES = {  # option: (flag, lowest allowed, integer?)
    "batch_size": ("--batch-size", 1, True), "concurrency": ("--concurrency", 1, True),
    "num_gpus": ("--num-gpus", 0, False), "rows_per_file": ("--rows-per-file", 1, True),
    "decode_batch_size": ("--decode-batch-size", 1, True), "fetch_concurrency": ("--fetch-concurrency", 1, True),
    "top_k": ("--top-k", 1, True), "wait": ("--wait", 0, False), "lease_ttl": ("--lease-ttl", 10, False),
}


def check_options(opts: TagOptions) -> None:
    for name, (flag, low, integer) in _RANGES.items():
        v = getattr(opts, name)
        if v is None:
            continue
        if (integer and int(v) != v) or v < low:
            raise TagError(f"{flag} {v}: must be {'an integer ' if integer else ''}>= {low}")
    if opts.actor_cpus is not None and opts.actor_cpus <= 0:
        raise TagError(f"--actor-cpus {opts.actor_cpus}: must be > 0")
    if opts.threshold is not None and not 0.0 < opts.threshold < 1.0:
        raise TagError(f"--threshold {opts.threshold}: must be between 0 and 1 (a probability)")
    if opts.threshold is not None and opts.top_k is not None:
        raise TagError("--threshold and --top-k choose labels two different ways; pass one of them")
    from mlray.device_decode import DECODE_MODES

    if opts.decode not in DECODE_MODES:
        raise TagError(f"--decode {opts.decode}: choose one of {', '.join(DECODE_MODES)}")
    from mlray.config import PRECISIONS

    if opts.precision not in PRECISIONS:
        raise TagError(f"--precision {opts.precision}: choose one of {', '.join(PRECISIONS)}")


def check_out(out: str) -> None:
    """OUT is a directory (or prefix) or does not exist yet, and nothing above it is a file."""
    if storage.exists(out) and not storage.is_dir(out):
        raise TagError(f"--out {out} is a file; OUT is a directory (or prefix) of Parquet parts")
    if not storage.is_remote(out):
        up = storage.resolve(out)[1]
        while True:
            parent = os.path.dirname(up)
            if parent == up:
                break
            if os.path.exists(parent) and not os.path.isdir(parent):
                raise TagError(f"--out {out}: {parent} is a file, so OUT cannot be created under it")
            up = parent


def check_model(model: str, *, load: bool = False) -> "RunArtifacts | Predictor":
    """The run directory's files are there and parse, and its weights file is whole
    and holds a head for the run's labels: read from the safetensors header, so the
    driver imports neither torch nor timm (~3 s of start-up); the scoring actors
    load the weights. ``load``: the model itself, on CPU (for embeddings, whose
    size and backbone digest only the built model knows)."""
    from mlray import rundir

    try:
        art = rundir.load_artifacts(model)
        if load:
            from mlray.inference import Predictor

            return Predictor(art, device="cpu")
        weights = rundir.scoring_weights(model)
        shapes = rundir.weight_shapes(weights)
    except FileNotFoundError as e:
        raise TagError(f"--model {e}") from e
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise TagError(f"--model {model}: the model does not load ({e})") from e
    n = len(art.vocab)
    if not any(len(s) in (2, 4) and s[0] == n for s in shapes.values()):
        raise TagError(f"--model {model}: {weights} holds no classifier for the run's {n} labels "
                       f"(labels.json); the weights and labels.json come from different runs")
    return art


def _vocab_text(vocab: list[str]) -> str:
    head = ", ".join(vocab[:4]) + (", ..." if len(vocab) > 4 else "")
    return f"{len(vocab)} labels: {head}"


def check_same_model(state: tag_plan.OutFiles, art: RunArtifacts, model: str, out: str, allow: bool) -> None:
    """OUT's rows were made by this model with this vocabulary, unless the user allows otherwise."""
    others = sorted(state.models - {art.model_id})
    vocabs = [json.loads(v) for v in state.vocabs]
    other_vocabs = [v for v in vocabs if v != list(art.vocab)]
    if allow or not (others or other_vocabs):
        return
    theirs = f"model {', '.join(others) or art.model_id}" + (
        f" with a vocabulary of {_vocab_text(other_vocabs[0])}" if other_vocabs else ""
    )
    raise TagError(
        f"--out {out} holds rows of {theirs}; --model {model} is {art.model_id} ({_vocab_text(list(art.vocab))}). "
        "Score positions would mean other labels. Tag into another --out, or pass --allow-model-change "
        "to add this model's rows on purpose"
    )


def _read_summary(out: str) -> dict | None:
    uri = storage.join(out, SUMMARY_FILE)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except ValueError:
        return None


def tag(model: str, input_uri: str, out: str, opts: TagOptions | None = None) -> TagSummary:
    """Tag every image of ``input_uri`` into ``out``; see the module docstring.

    Everything that can be checked is checked before Ray starts: the options,
    the model, the input, and OUT (writable: the lease is written there)."""
    opts = opts or TagOptions()
    check_options(opts)
    check_out(out)
    if opts.precision == "bf16" and not opts.num_gpus:
        from mlray.runtime import cpu_has_native_bf16

        if cpu_has_native_bf16() is False:
            print("--precision bf16: this CPU has no native bf16 (avx512_bf16 or AMX), where bf16 scores about "
                  "10x slower than fp32; CPUs without it score in fp32 (GPUs and CPUs with it in bf16)",
                  file=sys.stderr)
    embedding = scorer = None
    if not (opts.embeddings or opts.from_embeddings):
        art = check_model(model)
    else:
        predictor = check_model(model, load=True)
        art = predictor.art
        if opts.embeddings:
            embedding = {"model": art.model_id, "dim": predictor.embedding_dim,
                         "backbone_digest": predictor.backbone_digest}
        if opts.from_embeddings:
            if not storage.exists(input_uri):
                raise TagError(f"--from-embeddings {input_uri}: no such directory or prefix")
            try:
                _, source_info = tag_plan.embedding_parts(input_uri)
                tag_plan.check_backbone(source_info, predictor.backbone_digest, predictor.embedding_dim, input_uri,
                                        model)
            except ValueError as e:
                raise TagError(f"--from-embeddings {e}") from e
            if opts.embeddings:  # copied from the source: they describe what made them
                embedding = source_info
            from mlray.rescore import EmbeddingScores

            # the head alone (a D x C matrix) travels to the tasks; the backbone stays here
            scorer = EmbeddingScores.from_predictor(predictor, threshold=opts.threshold, top_k=opts.top_k,
                                                    keep_embeddings=opts.embeddings)
        del predictor  # the actors load their own; the driver keeps no weights
    if not opts.from_embeddings and not storage.exists(_listing_base(input_uri)):
        raise TagError(f"--input {input_uri}: no such file, directory or prefix")
    with Lease(out, ttl=opts.lease_ttl, wait=opts.wait) as lease:
        return _tag_locked(art, model, input_uri, out, opts, lease, embedding, scorer)


def _tag_locked(art: RunArtifacts, model: str, input_uri: str, out: str, opts: TagOptions, lease: Lease,
                embedding: dict | None, scorer=None) -> TagSummary:
    import ray.data

    from mlray.data import decode_dataset, read_manifest_dataset, table_dataset, with_absolute_uris
    from mlray.inference import score_dataset, score_schema
    from mlray.progress import counter
    from mlray.runtime import init_ray

    t0 = time.time()
    state = tag_plan.out_files(out)
    check_same_model(state, art, model, out, opts.allow_model_change)
    if state.embeddings and state.embeddings != {opts.embeddings}:
        has = "with" if True in state.embeddings else "without"
        raise TagError(
            f"--out {out} holds parts {has} embeddings; tag into it {has} --embeddings, or choose another --out"
        )
    previous = _read_summary(out)
    if (state.total and previous and previous.get("complete") and previous.get("input") != input_uri
            and not opts.incremental):
        raise TagError(
            f"--out {out} holds a finished tagging run of --input {previous.get('input')}; pass --incremental "
            "to add the new images of this input, or choose another --out"
        )
    manifest = opts.from_embeddings or _is_manifest(input_uri)
    listing = manifest_parts = None
    source = None
    if opts.from_embeddings:  # the source's parts are read like a packed manifest's: ids first, rows when new
        source = tag_plan.out_files(input_uri)
        manifest_parts = source.files
        packed, columns = True, ["image_id"]
    elif manifest:
        manifest_parts = manifest_files(input_uri)
        names = set(_schema_names(manifest_parts[0]))
        packed = "image" in names
        columns = ["image_id"] if packed or "uri" not in names else ["image_id", "uri"]
    else:
        listing = list_images(input_uri)
        packed, columns = False, ["image_id", "uri"]
    init_ray(quiet=True)
    # Rows to tag travel from the plan only when OUT holds some: otherwise every
    # input row is new, and the input is read as it is (a 100M-row first run
    # would otherwise park its whole listing in the object store).
    rows_from_plan = bool(state.total) and not packed
    if source is not None and not state.total:
        # a first rescore: every source row is new, and the source is a tag output,
        # whose ids its own runs keep unique; its footers count the rows
        work = tag_plan.Plan(rows_in=source.total, input_duplicates=0, skipped=0, new=source.total)
    elif listing is not None and not state.total and _unique(listing.column("image_id")):
        # a first run over a listing: every file is new; no join to run (1-2 s of tasks)
        work = tag_plan.Plan(rows_in=listing.num_rows, input_duplicates=0, skipped=0, new=listing.num_rows)
    else:
        work = tag_plan.plan(state, listing=listing, manifest_parts=manifest_parts, input_columns=columns,
                             retry_errors=opts.retry_errors, keep_rows=rows_from_plan)
    if work.rows_in == 0:
        raise TagError(f"--input {input_uri}: no rows")
    if work.input_duplicates:
        if opts.from_embeddings:
            raise TagError(f"--from-embeddings {input_uri}: {work.input_duplicates} duplicate image ids; run its "
                           "`mlray tag` command once more, which repairs duplicates, then this one")
        raise TagError(f"--input {input_uri}: {work.input_duplicates} duplicate image ids; ids must be unique")
    drop = tag_plan.choose_duplicates(state, work.dup_records)
    n_dups = sum(len(v) for v in drop.values())
    for image_id, k in work.retry_records:  # missing: rows about to be tagged again
        drop.setdefault(k, set()).add(image_id)
    dropped = tag_plan.drop_rows(state, drop) if drop else 0
    plan_seconds = time.time() - t0
    if n_dups or work.dup_records:
        print(f"repaired OUT: {len(set(r[0] for r in work.dup_records))} ids were held more than once; "
              f"kept one row each (a scored row first, then the first part by name)", file=sys.stderr)
    lease.check()
    # Rescoring writes one part per source part: a minimum of rows per write would
    # count the fused task's *input* rows (part names) and put every part in one task.
    sink = _AtomicParquetSink(out, score_schema(art.vocab, embedding), None if opts.from_embeddings else opts.rows_per_file)
    if work.new and opts.from_embeddings:
        from mlray.rescore import score_embedding_rows

        progress = counter()
        scorer.progress = progress
        # one task per source part: read, keep the new rows, score; no listing
        # step and no block of embeddings in the object store
        ds = ray.data.from_items([{"uri": f} for f in source.files], override_num_blocks=len(source.files))
        ds = ds.map_batches(score_embedding_rows, batch_format="pyarrow", batch_size=1,
                            fn_kwargs={"scorer": scorer, "new_refs": work.new_refs if state.total else None})
        _write(ds, sink, progress, work.new, model)
    elif work.new:
        if rows_from_plan:
            ds = ray.data.from_arrow_refs(work.new_refs)
            if manifest:
                ds = with_absolute_uris(ds, input_uri)
        elif manifest:
            ds = read_manifest_dataset(input_uri, None, ["image_id", "uri", "image"])
            if state.total:  # packed: the image bytes stay in the manifest until a new row is read
                ds = ds.map_batches(tag_plan.keep_new, batch_format="pyarrow", fn_kwargs={"new_refs": work.new_refs})
        else:
            ds = table_dataset(listing, opts.decode_batch_size)
        from mlray.device_decode import resolve_mode

        ds = decode_dataset(
            ds, size=art.config.data.image_size, vocab=None, decode_batch_size=opts.decode_batch_size,
            fetch_concurrency=opts.fetch_concurrency, keep=("image_id", "uri"),
            reblock=manifest or rows_from_plan, decode=resolve_mode(opts.decode, opts.num_gpus, "tag"),
        )
        progress = counter()
        ds = score_dataset(
            ds, model, batch_size=opts.batch_size, concurrency=opts.concurrency, num_gpus=opts.num_gpus,
            actor_cpus=opts.actor_cpus, threshold=opts.threshold, top_k=opts.top_k, progress=progress,
            embeddings=opts.embeddings, precision=opts.precision,
        )
        _write(ds, sink, progress, work.new, model)
    lease.check()
    seconds = time.time() - t0
    res = sink.result
    written, retryable = res["rows"], res["retryable"]
    errors = sum(res["errors"].values())
    summary = TagSummary(
        rows_in=work.rows_in, rows_skipped=work.skipped, rows_written=written, rows_scored=written - errors,
        rows_with_errors=errors, errors_by_reason=dict(res["errors"]), rows_in_out=state.total - dropped + written,
        duplicates=0, missing=work.rows_in - work.skipped - written - retryable, seconds=seconds,
        images_per_s=written / max(seconds, 1e-9), model=art.model_id, out=out, files_written=res["files"],
        retryable=retryable, retryable_ids=res["retryable_ids"], duplicates_repaired=n_dups,
        errors_retried=len(work.retry_records), plan_seconds=plan_seconds,
    )
    complete = summary.missing == 0 and retryable == 0
    doc = {**summary.__dict__, "complete": complete, "input": input_uri}
    storage.write_text(storage.join(out, SUMMARY_FILE), json.dumps(doc, indent=1))
    if retryable:
        raise TagError(
            f"{retryable} rows could not be fetched (storage unreachable or throttling, after retries) and were "
            f"left out of OUT; they are listed in {storage.join(out, SUMMARY_FILE)} as retryable. "
            f"Run the same command again to tag them.\n{summary.format()}"
        )
    if summary.missing:
        raise TagError(f"tagging finished inconsistent:\n{summary.format()}")
    return summary


def _unique(ids: pa.ChunkedArray) -> bool:
    return pc.count_distinct(ids).as_py() == len(ids)


def _write(ds, sink, progress, rows: int, model: str) -> None:
    """Run the pipeline into the sink; any failure becomes one line saying to rerun."""
    from mlray.progress import Watcher

    with Watcher(progress, rows, "tag"):
        try:
            ds.write_datasink(sink)
        except Exception as e:  # noqa: BLE001 - a storage outage, a lost node: one clear line
            from mlray.inference import MODEL_DOES_NOT_LOAD

            text = str(e)
            if MODEL_DOES_NOT_LOAD in text:  # running again would not help
                line = next(x for x in text.splitlines() if MODEL_DOES_NOT_LOAD in x)
                raise TagError(f"--model {model}: {line[line.index(MODEL_DOES_NOT_LOAD):]}") from None
            cause = text.strip().splitlines()[-1] if text.strip() else type(e).__name__
            raise TagError(
                f"the tagging job stopped: {cause}\nEvery part written so far is complete and kept; "
                "run the same command again to tag the rest"
            ) from e


def _schema_names(uri: str) -> list[str]:
    fs, path = storage.resolve(uri)
    return pq.read_schema(path, filesystem=fs).names

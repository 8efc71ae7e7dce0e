"""``mlray tag``: bulk inference over a corpus, scores and label sets to Parquet.

    mlray tag --model s3://bucket/runs/coco-001 --input s3://bucket/new/ --out s3://bucket/tags/

    checks (options, OUT, model, input) -> lease on OUT -> plan: OUT's ids joined
      with the input's in Ray tasks (``mlray.tagging.plan``), duplicates repaired
      -> fetch (retried) + decode (CPU tasks) -> model in an actor pool (GPU:
      num_gpus=1 per actor, bf16/fp16 autocast) -> atomic Parquet parts -> ``_summary.json``

Exactly once: every input row ends up once in OUT. Each output file appears
atomically and is named by a digest of the ids it holds, so a retried write
task replaces its own file instead of adding a second one; a job killed halfway
and run again skips the ids OUT already has, and a job run again after it
finished has nothing to do. ``--incremental`` is the nightly mode: OUT may hold
finished runs of other inputs, and only new ids are tagged. One job writes an
OUT at a time (``mlray.io.lease``). Rows whose image could not be fetched for a
transient cause are not written; the job exits non-zero and the next run tags them.

Ray Data's ``CheckpointConfig`` was considered for this and not used: it deletes
its id log when a run succeeds (so it cannot drive ``--incremental``), it writes
that log separately from the output (a crash between the two re-tags rows), and
on local paths it needs a network file system. The output itself is the log here.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from mlray.config import DEFAULT_RESOURCE_WAIT, PRECISIONS, check_options, option
from mlray.io import storage, tagged
from mlray.io.lease import Lease
from mlray.io.manifest import first_schema, manifest_files
from mlray.io.tagged import OutFiles
from mlray.model.device_decode import DECODE_MODES
from mlray.tagging import plan as tag_plan

if TYPE_CHECKING:
    from mlray.model.predictor import Predictor
    from mlray.model.rundir import RunArtifacts

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class TagError(RuntimeError):
    """The tagging job cannot run, or finished with rows missing or duplicated."""


@dataclass
class TagOptions:
    """``mlray tag``'s options: defaults, flags, help and ranges in one place (the CLI reads them)."""

    batch_size: int | None = option(None, "images per scoring call (default 64 on CPU, 256 with --num-gpus)",
                                    low=1, integer=True, type=int)
    concurrency: int = option(1, "model actors (one per GPU on clusters)", low=1, integer=True)
    num_gpus: float = option(0.0, "GPUs per model actor (1 on GPU clusters)", low=0)
    actor_cpus: float | None = option(None, "CPUs per model actor (default 0.5 on CPU, 1 with GPUs)", type=float)
    threshold: float | None = option(None, "one global threshold instead of the run's tuned ones", type=float)
    top_k: int | None = option(None, "the K best labels per image instead of thresholds", low=1, integer=True,
                               type=int)
    incremental: bool = option(False, "tag only ids not yet in OUT (nightly runs)")
    rows_per_file: int = option(20_000, "rows per output part", low=1, integer=True)
    decode_batch_size: int = option(128, "rows per fetch+decode task", low=1, integer=True)
    fetch_concurrency: int = option(16, "parallel reads inside a decode task", low=1, integer=True)
    wait: float = option(0.0, "wait (up to SECONDS, default forever) for another job writing OUT, instead of "
                         "refusing", low=0)
    resource_wait: float = option(DEFAULT_RESOURCE_WAIT, "on a cluster, seconds to wait for the scoring actors to "
                                  "fit (nodes being added) before failing; no value: forever", low=0)
    allow_model_change: bool = option(False, "add rows of this model to an OUT that holds another model's or "
                                      "vocabulary's rows")
    retry_errors: bool = option(False, "tag again the rows whose error was missing:")
    lease_ttl: float = option(120.0, "seconds a lease on OUT lives without renewal (renewed every third of it); "
                              "longer rides out longer storage outages", low=10)
    embeddings: bool = option(False, "add an embedding column: the pooled features that feed the head (float16)")
    from_embeddings: bool = option(False, "the input is a tag OUT with embeddings: rescore them, read no image",
                                   cli=False)
    precision: str = option("auto", "scoring precision", choices=PRECISIONS, cli=False)
    decode: str = option("auto", "where images are decoded: cpu (CPU tasks), device (in the scoring actor: nvJPEG "
                         "on its GPU, a thread pool on CPU), auto (device; training's auto is cpu without a GPU)",
                         choices=DECODE_MODES)


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
    retryable_ids: list[str] = field(default_factory=list)  # the first tagged.MAX_LISTED_IDS of them
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


# --- checks before any work: each failure is one line naming the flag or path ---


def check_tag_options(opts: TagOptions) -> None:
    check_options(opts, TagError)
    if opts.actor_cpus is not None and opts.actor_cpus <= 0:
        raise TagError(f"--actor-cpus {opts.actor_cpus}: must be > 0")
    if opts.threshold is not None and not 0.0 < opts.threshold < 1.0:
        raise TagError(f"--threshold {opts.threshold}: must be between 0 and 1 (a probability)")
    if opts.threshold is not None and opts.top_k is not None:
        raise TagError("--threshold and --top-k choose labels two different ways; pass one of them")


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
    from mlray.model import rundir

    try:
        art = rundir.load_artifacts(model)
        if load:
            from mlray.model.predictor import Predictor

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


def check_resources(opts: TagOptions) -> None:
    """The scoring actors fit this Ray (``mlray.resources``; with ``--num-gpus``, a
    GPU's torch can use it); the embedded Ray refuses at once, a cluster waits up
    to ``--resource-wait``. Rescoring embeddings runs in plain tasks: nothing to check."""
    import math

    from mlray.model.scoring import scoring_actor_cpus
    from mlray.resources import Demand, ResourceError, ensure_resources

    if opts.from_embeddings:
        return
    cpus = scoring_actor_cpus(opts.num_gpus, opts.actor_cpus)
    demand = Demand(
        what="scoring actors", count=opts.concurrency, per={"CPU": cpus, "GPU": opts.num_gpus},
        count_key=f"--concurrency {opts.concurrency}",
        keys={"CPU": f"--actor-cpus {cpus:g}", **({"GPU": f"--num-gpus {opts.num_gpus:g}"} if opts.num_gpus else {})},
        wait_key="--resource-wait",
    )
    try:
        ensure_resources(demand, None if math.isinf(opts.resource_wait) else opts.resource_wait,
                         gpu_flag=f"--num-gpus {opts.num_gpus:g}")
    except ResourceError as e:
        raise TagError(str(e)) from None


def _vocab_text(vocab: list[str]) -> str:
    head = ", ".join(vocab[:4]) + (", ..." if len(vocab) > 4 else "")
    return f"{len(vocab)} labels: {head}"


def check_same_model(state: OutFiles, art: RunArtifacts, model: str, out: str, allow: bool) -> None:
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


def tag(model: str, input_uri: str, out: str, opts: TagOptions | None = None) -> TagSummary:
    """Tag every image of ``input_uri`` into ``out``; see the module docstring.

    Everything that can be checked is checked before Ray starts: the options,
    the model, the input, and OUT (writable: the lease is written there)."""
    opts = opts or TagOptions()
    check_tag_options(opts)
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
                _, source_info = tagged.embedding_parts(input_uri)
                tagged.check_backbone(source_info, predictor.backbone_digest, predictor.embedding_dim, input_uri,
                                        model)
            except ValueError as e:
                raise TagError(f"--from-embeddings {e}") from e
            if opts.embeddings:  # copied from the source: they describe what made them
                embedding = source_info
            from mlray.tagging.rescore import EmbeddingScores

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
    """The job, OUT's lease held: read OUT, describe the input, plan, repair, tag, summarise."""
    from mlray.runtime import init_ray

    t0 = time.time()
    state = _read_out(out, art, model, input_uri, opts)
    inp = _describe_input(input_uri, opts)
    init_ray(quiet=True)
    check_resources(opts)
    work = _plan(state, inp, opts)
    n_dups, dropped = _repair(state, work)
    plan_seconds = time.time() - t0
    lease.check()
    # Rescoring writes one part per source part: a minimum of rows per write would
    # count the fused task's *input* rows (part names) and put every part in one task.
    sink = tagged.parquet_sink(out, tagged.score_schema(art.vocab, embedding),
                               None if opts.from_embeddings else opts.rows_per_file)
    if work.new:
        from mlray.progress import counter

        progress = counter()
        _write(_dataset(art, model, inp, state, work, opts, scorer, progress), sink, progress, work.new, model)
    lease.check()
    return _summarize(sink.result, work, state, dropped, n_dups, time.time() - t0, plan_seconds, art, input_uri, out)


def _read_out(out: str, art: RunArtifacts, model: str, input_uri: str, opts: TagOptions) -> OutFiles:
    """OUT's parts, from their footers, checked against this job: the same model and
    vocabulary, embeddings or not like this job, and (unless ``--incremental``) no
    finished run of another input."""
    state = tagged.out_files(out)
    check_same_model(state, art, model, out, opts.allow_model_change)
    if state.embeddings and state.embeddings != {opts.embeddings}:
        has = "with" if True in state.embeddings else "without"
        raise TagError(
            f"--out {out} holds parts {has} embeddings; tag into it {has} --embeddings, or choose another --out"
        )
    previous = tagged.read_summary(out)
    if (state.total and previous and previous.get("complete") and previous.get("input") != input_uri
            and not opts.incremental):
        raise TagError(
            f"--out {out} holds a finished tagging run of --input {previous.get('input')}; pass --incremental "
            "to add the new images of this input, or choose another --out"
        )
    return state


@dataclass
class _Input:
    """What the input is, and what of it the plan reads."""

    uri: str
    manifest: bool  # Parquet parts: a manifest, or (--from-embeddings) a tag OUT read like a packed one
    packed: bool  # the rows carry more than ids and URIs (image bytes, embeddings): they stay in storage
    columns: list[str]  # the columns the plan reads
    parts: list[str] | None = None
    listing: pa.Table | None = None  # ``image_id, uri`` of the files under a prefix or glob
    source: OutFiles | None = None  # --from-embeddings: the source OUT


def _describe_input(input_uri: str, opts: TagOptions) -> _Input:
    if opts.from_embeddings:  # the source's parts are read like a packed manifest's: ids first, rows when new
        source = tagged.out_files(input_uri)
        return _Input(input_uri, True, True, ["image_id"], parts=source.files, source=source)
    if _is_manifest(input_uri):
        parts = manifest_files(input_uri)
        names = set(first_schema(input_uri).names)
        packed = "image" in names
        columns = ["image_id"] if packed or "uri" not in names else ["image_id", "uri"]
        return _Input(input_uri, True, packed, columns, parts=parts)
    return _Input(input_uri, False, False, ["image_id", "uri"], listing=list_images(input_uri))


def _rows_from_plan(state: OutFiles, inp: _Input) -> bool:
    """Rows to tag travel from the plan only when OUT holds some: otherwise every
    input row is new, and the input is read as it is (a 100M-row first run would
    otherwise park its whole listing in the object store)."""
    return bool(state.total) and not inp.packed


def _plan(state: OutFiles, inp: _Input, opts: TagOptions) -> tag_plan.Plan:
    """Which input rows are new, and which OUT holds twice (``mlray.tagging.plan``)."""
    if inp.source is not None and not state.total:
        # a first rescore: every source row is new, and the source is a tag output,
        # whose ids its own runs keep unique; its footers count the rows
        work = tag_plan.Plan(rows_in=inp.source.total, input_duplicates=0, skipped=0, new=inp.source.total)
    elif inp.listing is not None and not state.total and _unique(inp.listing.column("image_id")):
        # a first run over a listing: every file is new; no join to run (1-2 s of tasks)
        work = tag_plan.Plan(rows_in=inp.listing.num_rows, input_duplicates=0, skipped=0, new=inp.listing.num_rows)
    else:
        work = tag_plan.plan(state, listing=inp.listing, manifest_parts=inp.parts, input_columns=inp.columns,
                             retry_errors=opts.retry_errors, keep_rows=_rows_from_plan(state, inp))
    if work.rows_in == 0:
        raise TagError(f"--input {inp.uri}: no rows")
    if work.input_duplicates:
        if opts.from_embeddings:
            raise TagError(f"--from-embeddings {inp.uri}: {work.input_duplicates} duplicate image ids; run its "
                           "`mlray tag` command once more, which repairs duplicates, then this one")
        raise TagError(f"--input {inp.uri}: {work.input_duplicates} duplicate image ids; ids must be unique")
    return work


def _repair(state: OutFiles, work: tag_plan.Plan) -> tuple[int, int]:
    """Drop the extra rows of ids OUT holds twice, and the ``missing:`` rows about
    to be tagged again. Returns (duplicate rows repaired, rows dropped in all)."""
    drop = tag_plan.choose_duplicates(state, work.dup_records)
    n_dups = sum(len(v) for v in drop.values())
    for image_id, k in work.retry_records:
        drop.setdefault(k, set()).add(image_id)
    dropped = tag_plan.drop_rows(state, drop) if drop else 0
    if n_dups or work.dup_records:
        print(f"repaired OUT: {len(set(r[0] for r in work.dup_records))} ids were held more than once; "
              f"kept one row each (a scored row first, then the first part by name)", file=sys.stderr)
    return n_dups, dropped


def _dataset(art: RunArtifacts, model: str, inp: _Input, state: OutFiles, work: tag_plan.Plan, opts: TagOptions,
             scorer, progress):
    """The Ray Dataset of the new rows, scored: stored embeddings through the head
    (``scorer``), or images fetched, decoded and scored by the model's actors."""
    import ray.data

    from mlray.data.pipeline import decode_dataset, read_manifest_dataset, with_absolute_uris
    from mlray.data.readtasks import table_dataset
    from mlray.model.device_decode import resolve_mode
    from mlray.model.scoring import score_dataset

    if opts.from_embeddings:
        from mlray.tagging.rescore import score_embedding_rows

        scorer.progress = progress
        # one task per source part: read, keep the new rows, score; no listing
        # step and no block of embeddings in the object store
        ds = ray.data.from_items([{"uri": f} for f in inp.parts], override_num_blocks=len(inp.parts))
        return ds.map_batches(score_embedding_rows, batch_format="pyarrow", batch_size=1,
                              fn_kwargs={"scorer": scorer, "new_refs": work.new_refs if state.total else None})
    from_plan = _rows_from_plan(state, inp)
    if from_plan:
        ds = ray.data.from_arrow_refs(work.new_refs)
        if inp.manifest:
            ds = with_absolute_uris(ds, inp.uri)
    elif inp.manifest:
        ds = read_manifest_dataset(inp.uri, None, ["image_id", "uri", "image"])
        if state.total:  # packed: the image bytes stay in the manifest until a new row is read
            ds = ds.map_batches(tag_plan.keep_new, batch_format="pyarrow", fn_kwargs={"new_refs": work.new_refs})
    else:
        ds = table_dataset(inp.listing, opts.decode_batch_size)
    ds = decode_dataset(
        ds, size=art.config.data.image_size, vocab=None, decode_batch_size=opts.decode_batch_size,
        fetch_concurrency=opts.fetch_concurrency, keep=("image_id", "uri"),
        reblock=inp.manifest or from_plan, decode=resolve_mode(opts.decode, opts.num_gpus, "tag"),
    )
    return score_dataset(
        ds, model, batch_size=opts.batch_size, concurrency=opts.concurrency, num_gpus=opts.num_gpus,
        actor_cpus=opts.actor_cpus, threshold=opts.threshold, top_k=opts.top_k, progress=progress,
        embeddings=opts.embeddings, precision=opts.precision,
    )


def _summarize(res: dict, work: tag_plan.Plan, state: OutFiles, dropped: int, n_dups: int, seconds: float,
               plan_seconds: float, art: RunArtifacts, input_uri: str, out: str) -> TagSummary:
    """Count rows in and out, write ``_summary.json``, and fail when rows are missing
    (inconsistent) or were left out for the next run (transient fetch errors)."""
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
    where = tagged.write_summary(out, {**summary.__dict__, "complete": complete, "input": input_uri})
    if retryable:
        raise TagError(
            f"{retryable} rows could not be fetched (storage unreachable or throttling, after retries) and were "
            f"left out of OUT; they are listed in {where} as retryable. "
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
            from mlray.model.scoring import MODEL_DOES_NOT_LOAD

            text = str(e)
            if MODEL_DOES_NOT_LOAD in text:  # running again would not help
                line = next(x for x in text.splitlines() if MODEL_DOES_NOT_LOAD in x)
                raise TagError(f"--model {model}: {line[line.index(MODEL_DOES_NOT_LOAD):]}") from None
            cause = text.strip().splitlines()[-1] if text.strip() else type(e).__name__
            raise TagError(
                f"the tagging job stopped: {cause}\nEvery part written so far is complete and kept; "
                "run the same command again to tag the rest"
            ) from e

"""The ``mlray`` command: prepare, stats, train, evaluate, predict, tag, head, audit, demo.

    mlray prepare labels.csv --images s3://bucket/images --out s3://bucket/manifest --pack
    mlray stats s3://bucket/manifest
    mlray train --config jobs/configs/demo.yaml optim.epochs=3
    mlray evaluate RUN --manifest M --split test
    mlray predict RUN img1.jpg s3://bucket/img2.png
    mlray tag --model RUN --input s3://bucket/new/ --out s3://bucket/tags/ --embeddings
    mlray head --model RUN --embeddings s3://bucket/tags/ --manifest M2 --out s3://bucket/runs/new-labels
    mlray tag --model s3://bucket/runs/new-labels --from-embeddings s3://bucket/tags/ --out s3://bucket/tags2/
    mlray audit --manifest M --model RUN --out s3://bucket/audit/ --embeddings s3://bucket/tags/
    mlray prepare --fixes s3://bucket/audit/fixes.csv --manifest M --out M2

Exit status: 0 done, 1 failed, 2 refused (bad input, named on one line), 3 drifted
(``tag --fail-on-drift``: everything was written, and labels or the mean top score
moved away from the model's validation split), 130 or 143 interrupted by SIGINT
(Ctrl-C) or SIGTERM (``ray job stop``, a scheduler), after one line saying how to
continue; what was written stays.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from mlray.config import DEFAULT_RESOURCE_WAIT, ConfigError, option_flag
from mlray.io.lease import LeaseHeld
from mlray.io.manifest import ManifestError
from mlray.data.sources import SourceError
from mlray.io.storage import StorageError
from mlray.resources import ResourceError
from mlray.runtime import catch_interrupts, interrupt_status, stop_ray
from mlray.tagging.job import TagError

USER_ERRORS = (ConfigError, LeaseHeld, ManifestError, ResourceError, SourceError, StorageError, TagError, ValueError,
               FileNotFoundError)
# what an interrupted command keeps, and how to go on (``main``)
RERUN = "what was written is complete and kept; run the same command again to continue"
# `tag --fail-on-drift`: the run finished and wrote everything, and its corpus drifted
# from the model's validation split; distinct from 1 (failed) and 2 (refused) so a nightly job can alert on it
DRIFT_EXIT = 3


def _prepare(args: argparse.Namespace) -> int:
    from mlray.data.prepare import prepare
    from mlray.data.stats import format_stats

    if args.fixes or args.manifest:
        return _prepare_fixes(args)
    if not args.source or not args.images:
        raise ConfigError("mlray prepare needs a label SOURCE and --images (or --fixes FIXES.csv --manifest M)")

    result = prepare(
        args.source, args.images, args.out, split=args.split, seed=args.seed, pack=args.pack,
        skip_missing=args.skip_missing, resplit=args.resplit, filename_column=args.filename_column,
        labels_column=args.labels_column, label_names=args.label_names, concurrency=args.concurrency,
    )
    print(format_stats(result.stats))
    if result.missing:
        print(f"skipped {len(result.missing)} rows whose image does not exist, e.g. {result.missing[:5]}")
    print(f"manifest: {args.out} ({len(result.files)} file(s), {result.stats['images']} images)")
    return 0


def _prepare_fixes(args: argparse.Namespace) -> int:
    from mlray.data.fixes import apply_fixes

    if not (args.fixes and args.manifest):
        raise ConfigError("--fixes FIXES.csv and --manifest M go together: the fixes are applied to M's labels")
    if args.source or args.images:
        raise ConfigError("--fixes applies reviewed label changes to --manifest; it takes no SOURCE or --images")
    result = apply_fixes(args.manifest, args.fixes, args.out)
    print(result.format())
    print(f"manifest: {args.out} ({len(result.files)} file(s), {result.rows} images)")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from mlray.io.manifest import read_manifest
    from mlray.data.stats import format_stats, manifest_stats

    table, vocab = read_manifest(args.manifest)
    stats = manifest_stats(table, vocab)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats, max_labels=args.max_labels))
    return 0


def _train(args: argparse.Namespace) -> int:
    from mlray.config import load_config
    from mlray.training.trainer import train

    if args.resume:
        from mlray.model import rundir
        from mlray.io import storage

        cfg = load_config(storage.join(args.resume, rundir.CONFIG), args.overrides)
    else:
        if not args.config:
            raise ConfigError("mlray train needs --config CONFIG.yaml (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.overrides)
    from mlray.model.rundir import run_dir
    from mlray.training.trainer import has_checkpoint, resolve_paths

    directory = run_dir(resolve_paths(cfg))
    args.rerun = lambda: (f"the checkpoints written so far are kept; continue with: mlray train --resume {directory}"
                          if has_checkpoint(directory) else "no epoch had finished; run the same command again")
    result = train(cfg, resume=bool(args.resume))
    best = result.best
    if best:
        print(f"best epoch {best['epoch']}: val mAP {best['record']['val_mAP']:.4f} "
              f"(label prior {best['record']['prior_mAP']:.4f})")
    print(f"run directory: {result.run_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mlray.evaluation.report import evaluate, format_summary

    wait = None if args.resource_wait == float("inf") else args.resource_wait
    doc = evaluate(args.run, args.manifest, args.split, args.out, batch_size=args.batch_size, num_gpus=args.num_gpus,
                   precision=args.precision, resource_wait=wait)
    print(format_summary(doc))
    return 1 if doc["collapse"]["collapsed"] and args.fail_on_collapse else 0


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from mlray.io import storage
    from mlray.data.images import ImageError, decode
    from mlray.model.predictor import Predictor

    predictor = Predictor.load(args.run, None if args.device == "auto" else args.device, precision=args.precision)
    policy = predictor.art.policy
    failed = 0
    for uri in args.images:
        try:
            img = decode(storage.read_bytes(uri), predictor.size)
        except (ImageError, StorageError) as e:
            print(f"{uri}: ERROR {e}")
            failed += 1
            continue
        scores = predictor.scores(img[None])[0]
        chosen = np.flatnonzero(policy.predict(scores[None])[0])
        chosen = chosen[np.argsort(-scores[chosen])]
        labels = ", ".join(f"{predictor.vocab[j]} {scores[j]:.2f}" for j in chosen) or "(no label)"
        print(f"{uri}: {labels}")
        if args.top:
            top = np.argsort(-scores)[: args.top]
            print("    top: " + ", ".join(f"{predictor.vocab[j]} {scores[j]:.3f}" for j in top))
    return 1 if failed else 0


def _tag(args: argparse.Namespace) -> int:
    from mlray.tagging.job import TagOptions, tag

    opts = _options(TagOptions, args, from_embeddings=bool(args.from_embeddings))
    summary = tag(args.model, args.from_embeddings or args.input, args.out, opts)
    print(summary.format())
    return DRIFT_EXIT if args.fail_on_drift and summary.drift.get("drifted") else 0


def _head(args: argparse.Namespace) -> int:
    from mlray.training.head import HeadOptions, train_head

    opts = _options(HeadOptions, args, overrides=args.overrides)
    print(train_head(args.model, args.embeddings, args.manifest, args.out, opts).format())
    return 0


def _audit(args: argparse.Namespace) -> int:
    from mlray.audit.job import AuditOptions, audit

    opts = _options(AuditOptions, args, overrides=args.overrides)
    print(audit(args.manifest, args.model, args.out, args.embeddings, opts).format())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mlray.demo.run import run_demo

    run_demo(args.config, args.out, images=args.images, epochs=args.epochs)
    return 0


def add_options(parser: argparse.ArgumentParser, cls: type, **special: dict) -> None:
    """One flag per field of an options dataclass (``config.option``): its default,
    help and type come from the field. ``special``: argparse keywords that replace
    those of a field (e.g. ``wait={"nargs": "?", ...}``)."""
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict = {"dest": f.name, "default": default, "help": f.metadata.get("help", "")}
        if isinstance(default, bool):
            kw["action"] = "store_true"
        else:
            kw["type"] = f.metadata.get("type") or type(default)
            if f.metadata.get("choices"):
                kw["choices"] = list(f.metadata["choices"])
            if default is not None:
                kw["help"] += " (default %(default)s)"
        kw.update(special.get(f.name, {}))
        parser.add_argument(option_flag(f), **kw)


def _options(cls: type, args: argparse.Namespace, **given):
    """An options dataclass from parsed flags (``add_options``) and ``given`` values."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **given})


def _precision_flag(parser: argparse.ArgumentParser) -> None:
    from mlray.config import PRECISIONS

    parser.add_argument(
        "--precision", default="auto", choices=list(PRECISIONS),
        help="scoring precision: auto = the run's mixed precision on a GPU (bf16 or fp16), fp32 on CPU; "
             "bf16 on a GPU and on CPUs with avx512_bf16 or AMX (about 2x faster there; other CPUs, where it "
             "is emulated and ~11x slower, score in fp32), "
             "scores within ~1%% of fp32. Evaluate in the precision you tag in.",
    )


def build_parser() -> argparse.ArgumentParser:
    from mlray.audit.job import AuditOptions
    from mlray.tagging.job import TagOptions
    from mlray.training.head import HeadOptions

    p = argparse.ArgumentParser(prog="mlray", description="Multi-label image classification on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="label source + images -> Parquet manifest with splits and report; "
                        "or --fixes: a manifest with reviewed label fixes applied")
    pr.add_argument("source", nargs="?", help="one-hot CSV, label-list CSV/Parquet, or COCO instances JSON (local or s3://)")
    pr.add_argument("--images", help="root that filenames are relative to (local or s3://); needed with SOURCE")
    pr.add_argument("--out", required=True, help="manifest directory to write (local or s3://)")
    pr.add_argument("--split", default="train=0.8,val=0.1,test=0.1", help="split fractions (default %(default)s)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--pack", action="store_true", help="embed image bytes in the manifest (few large objects)")
    pr.add_argument("--skip-missing", action="store_true", help="leave out rows whose image does not exist")
    pr.add_argument("--resplit", action="store_true", help="ignore a split column in the source")
    pr.add_argument("--filename-column", help="column holding image filenames (default: detected)")
    pr.add_argument("--labels-column", help="column holding label lists (default: detected)")
    pr.add_argument("--label-names", help="label names file: one per line, or a CSV with a Labels column")
    pr.add_argument("--concurrency", type=int, default=32, help="parallel image reads")
    pr.add_argument("--fixes", metavar="FIXES.csv", help="apply the kept rows of an audit's fixes.csv to --manifest "
                    "(same ids, splits and order) and write the result to --out")
    pr.add_argument("--manifest", help="with --fixes: the manifest the audit ran on")
    pr.set_defaults(func=_prepare)

    st = sub.add_parser("stats", help="dataset report of a manifest")
    st.add_argument("manifest")
    st.add_argument("--json", action="store_true")
    st.add_argument("--max-labels", type=int, default=30, help="labels listed (most and least frequent)")
    st.set_defaults(func=_stats)

    tr = sub.add_parser("train", help="fine-tune a timm backbone on a manifest with Ray Train")
    tr.add_argument("--config", help="YAML config (see jobs/configs/)")
    tr.add_argument("--resume", metavar="RUN_DIR", help="resume a stopped run from its last checkpoint")
    tr.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. optim.epochs=3")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="metrics, baselines, thresholds and an HTML report on a split")
    ev.add_argument("run", help="run directory (storage_path/run name), local or s3://")
    ev.add_argument("--manifest", required=True)
    ev.add_argument("--split", default="test")
    ev.add_argument("--out", help="report directory (default RUN/report/SPLIT)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--num-gpus", type=float, default=0.0, help="GPUs for the scoring actor (1 on a GPU machine)")
    ev.add_argument("--resource-wait", type=float, nargs="?", const=float("inf"), default=DEFAULT_RESOURCE_WAIT,
                    metavar="SECONDS", help="on a cluster, seconds to wait for the scoring actor to fit (nodes being "
                    "added) before failing; no value: forever (default %(default)s)")
    _precision_flag(ev)
    ev.add_argument("--fail-on-collapse", action="store_true", help="exit 1 when the model is no better than trivial")
    ev.set_defaults(func=_evaluate)

    pd = sub.add_parser("predict", help="labels and probabilities for a few images")
    pd.add_argument("run", help="run directory or checkpoint folder")
    pd.add_argument("images", nargs="+", help="image paths or URIs")
    pd.add_argument("--top", type=int, default=0, help="also print the N highest scores")
    pd.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: a GPU when there is one)")
    _precision_flag(pd)
    pd.set_defaults(func=_predict)

    tg = sub.add_parser("tag", help="batched inference over a corpus into Parquet, exactly once per image")
    tg.add_argument("--model", required=True, help="run directory or checkpoint folder")
    src = tg.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="a manifest, or a prefix/glob of image files (local or s3://)")
    src.add_argument("--from-embeddings", metavar="TAGS_OUT",
                     help="rescore the embeddings a `tag --embeddings` run stored in TAGS_OUT; no image is read")
    tg.add_argument("--out", required=True, help="output Parquet directory (local or s3://)")
    add_options(tg, TagOptions, wait={"nargs": "?", "const": float("inf"), "metavar": "SECONDS"},
                resource_wait={"nargs": "?", "const": float("inf"), "metavar": "SECONDS"})
    _precision_flag(tg)
    tg.add_argument("--fail-on-drift", action="store_true",
                    help=f"exit {DRIFT_EXIT} (after writing everything) when labels or the mean top score drifted "
                         "from the run's validation split (a nightly alert)")
    tg.set_defaults(func=_tag)

    hd = sub.add_parser("head", help="train a new head on stored embeddings (new labels without reading images)")
    hd.add_argument("--model", required=True, help="run whose backbone made the embeddings")
    hd.add_argument("--embeddings", required=True, metavar="TAGS_OUT", help="OUT of a `mlray tag --embeddings` run")
    hd.add_argument("--manifest", required=True, help="labelled manifest (ids, labels, splits); joined by image_id")
    hd.add_argument("--out", required=True, help="new run directory (local or s3://)")
    add_options(hd, HeadOptions)
    hd.add_argument("overrides", nargs="*", help="key=value for the new run's config, e.g. loss.name=bce")
    hd.set_defaults(func=_head)

    au = sub.add_parser("audit", help="rank the label errors of a manifest (out-of-fold heads on embeddings): "
                        "suspects, an HTML report and a fixes.csv for `prepare --fixes`")
    au.add_argument("--manifest", required=True, help="labelled manifest to audit (ids, labels, content hashes)")
    au.add_argument("--model", required=True, help="run whose backbone embeds the images (and whose loss fits the heads)")
    au.add_argument("--out", required=True, help="audit directory: suspects.parquet, report.html, fixes.csv, ...")
    au.add_argument("--embeddings", metavar="TAGS_OUT", help="OUT of a `mlray tag --embeddings` run with RUN's "
                    "backbone; images it lacks are embedded now (default: all are)")
    add_options(au, AuditOptions)
    au.add_argument("overrides", nargs="*", help="key=value for the heads' config, e.g. loss.name=bce")
    au.set_defaults(func=_audit)

    dm = sub.add_parser("demo", help="compose a data set from packaged images, then prepare, train, evaluate, tag")
    dm.add_argument("--config", default="jobs/configs/demo.yaml")
    dm.add_argument("--out", default="out/demo")
    dm.add_argument("--images", type=int, default=1500)
    dm.add_argument("--epochs", type=int, help="override optim.epochs")
    dm.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    catch_interrupts()
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C, or SIGTERM (``ray job stop``): one line, then the embedded Ray stops (a
        # cluster ends this job's actors as it disconnects); leases were released on the way out
        name, status = interrupt_status()
        rerun = getattr(args, "rerun", RERUN)
        print(f"interrupted ({name}): {rerun() if callable(rerun) else rerun}", file=sys.stderr, flush=True)
        stop_ray()
        return status


if __name__ == "__main__":
    sys.exit(main())

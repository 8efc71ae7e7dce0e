"""The ``mlray`` command: prepare, stats, train, evaluate, predict, tag, demo.

    mlray prepare labels.csv --images s3://bucket/images --out s3://bucket/manifest --pack
    mlray stats s3://bucket/manifest
    mlray train --config jobs/configs/demo.yaml optim.epochs=3
    mlray evaluate RUN --manifest M --split test
    mlray predict RUN img1.jpg s3://bucket/img2.png
    mlray tag --model RUN --input s3://bucket/new/ --out s3://bucket/tags/
"""

from __future__ import annotations

import argparse
import json
import sys

from mlray.config import ConfigError
from mlray.manifest import ManifestError
from mlray.sources import SourceError
from mlray.storage import StorageError

USER_ERRORS = (ConfigError, ManifestError, SourceError, StorageError, ValueError, FileNotFoundError)


def _prepare(args: argparse.Namespace) -> int:
    from mlray.prepare import prepare
    from mlray.stats import format_stats

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


def _stats(args: argparse.Namespace) -> int:
    from mlray.manifest import read_manifest
    from mlray.stats import format_stats, manifest_stats

    table, vocab = read_manifest(args.manifest)
    stats = manifest_stats(table, vocab)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats, max_labels=args.max_labels))
    return 0


def _train(args: argparse.Namespace) -> int:
    from mlray.config import load_config
    from mlray.train import train

    if args.resume:
        from mlray import rundir, storage

        cfg = load_config(storage.join(args.resume, rundir.CONFIG), args.overrides)
    else:
        if not args.config:
            raise ConfigError("mlray train needs --config CONFIG.yaml (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=bool(args.resume))
    best = result.best
    if best:
        print(f"best epoch {best['epoch']}: val mAP {best['record']['val_mAP']:.4f} "
              f"(label prior {best['record']['prior_mAP']:.4f})")
    print(f"run directory: {result.run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlray", description="Multi-label image classification on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="label source + images -> Parquet manifest with splits and report")
    pr.add_argument("source", help="one-hot CSV, label-list CSV/Parquet, or COCO instances JSON (local or s3://)")
    pr.add_argument("--images", required=True, help="root that filenames are relative to (local or s3://)")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``mlray prepare``: a label source plus a bucket of images -> a manifest.

    mlray prepare labels.csv --images s3://bucket/images --out s3://bucket/manifest --pack

Steps: read the source (one-hot CSV, label lists, or COCO), check every image
exists (one listing of the image root, not one request per file), hash each
image's bytes so copies of one picture stay in one split, assign splits by
multi-label iterative stratification, and write Parquet parts (optionally with
the image bytes packed in) plus the dataset report. Local images are stored relative to a local manifest's
directory (``stored_uris``), so neither depends on the directory prepare ran in.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
from tqdm.auto import tqdm

from mlray.io import storage
from mlray.io.manifest import SPLITS, ManifestWriter, build_table, storage_order
from mlray.data.sources import Source, SourceError, load_source
from mlray.data.splits import iterative_split, parse_ratios
from mlray.data.stats import manifest_stats

CHUNK = 512  # images fetched per round; bounds memory while packing
PACK_CACHE_BYTES = 1 << 30  # keep bytes from the hashing pass up to this, else read again


@dataclass
class PrepareResult:
    files: list[str]
    stats: dict
    missing: list[str] = field(default_factory=list)


def _check_unique(src: Source) -> None:
    rows: dict[str, list[int]] = defaultdict(list)
    for f, r in zip(src.filenames, src.rows):
        rows[f].append(r)
    dupes = {f: r for f, r in rows.items() if len(r) > 1}
    if dupes:
        shown = "; ".join(f"{f!r} at rows {r}" for f, r in list(dupes.items())[:5])
        raise SourceError(f"{src.path}: {len(dupes)} duplicate image ids (filenames): {shown}; each image once")


def _missing(uris: list[str], images_root: str) -> list[int]:
    """Indices of ``uris`` that do not exist, from one recursive listing of the root."""
    try:
        present = set(storage.list_files(images_root, skip_hidden=False))
    except storage.StorageError as e:
        raise SourceError(f"--images {images_root}: {e}") from e
    root = images_root.rstrip("/") + "/"
    out = []
    for i, u in enumerate(uris):
        if u in present:
            continue
        if u.startswith(root) or not storage.exists(u):
            out.append(i)
    return out


def stored_uris(uris: list[str], under_images: list[bool], out: str, packed: bool) -> list[str]:
    """The ``uri`` values to store for images at ``uris`` in a manifest written to ``out``.

    With the manifest and the images both on local disk, images named relative to
    ``--images`` are stored relative to the manifest's directory (``../images/x.jpg``):
    the manifest reads the same from any working directory, and a folder holding
    both can be moved or synced (to S3 too) as one. Anything else stays absolute.
    """
    out_dir = storage.local_path(out)
    if out_dir is None:
        local = [u for u in uris if storage.local_path(u) is not None]
        if local and not packed:
            print(f"note: the manifest {out} points to images on this machine's disk (e.g. {local[0]}): only "
                  "nodes that see that path can read them; --pack stores the images in the manifest",
                  file=sys.stderr)
        return list(uris)
    out_uris = []
    for u, rel in zip(uris, under_images):
        path = storage.local_path(u)
        if rel and path is not None:
            try:
                u = os.path.relpath(path, out_dir).replace(os.sep, "/")
            except ValueError:  # another drive (Windows): no relative path exists
                pass
        out_uris.append(u)
    return out_uris


def _hash_all(uris: list[str], keep: bool, concurrency: int) -> tuple[list[str], list[bytes] | None]:
    hashes: list[str] = []
    cache: list[bytes] | None = [] if keep else None
    held = 0
    with tqdm(total=len(uris), desc="hash images", unit="img", disable=None) as bar:
        for i in range(0, len(uris), CHUNK):
            chunk = uris[i : i + CHUNK]
            for u, data in zip(chunk, storage.fetch_many(chunk, concurrency)):
                if isinstance(data, Exception):
                    raise SourceError(f"{u}: could not read image: {data}")
                hashes.append(hashlib.sha256(data).hexdigest())
                if cache is not None:
                    held += len(data)
                    if held > PACK_CACHE_BYTES:
                        cache = None
                    else:
                        cache.append(data)
            bar.update(len(chunk))
    return hashes, cache


def prepare(
    source: str,
    images: str,
    out: str,
    *,
    split: str = "train=0.8,val=0.1,test=0.1",
    seed: int = 0,
    pack: bool = False,
    skip_missing: bool = False,
    resplit: bool = False,
    filename_column: str | None = None,
    labels_column: str | None = None,
    label_names: str | None = None,
    concurrency: int = 32,
) -> PrepareResult:
    src = load_source(source, filename_column=filename_column, labels_column=labels_column, label_names=label_names)
    if len(src) == 0:
        raise SourceError(f"{source}: no rows")
    _check_unique(src)
    root = storage.local_path(images) or images  # a relative --images means the current directory's
    uris = [storage.normalize(storage.absolute(f, root)) for f in src.filenames]
    missing_idx = _missing(uris, root)
    missing = [src.filenames[i] for i in missing_idx]
    if missing and not skip_missing:
        shown = "\n  ".join(f"row {src.rows[i]}: {uris[i]}" for i in missing_idx[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise SourceError(
            f"{source}: {len(missing)} image files do not exist under {images}:\n  {shown}{more}\n"
            "Fix the paths, or pass --skip-missing to leave these rows out (they are listed in the report)."
        )
    gone = set(missing_idx)
    keep = [i for i in range(len(src)) if i not in gone]
    if not keep:
        raise SourceError(f"{source}: none of the {len(src)} images exist under {images}")
    given_relative = [not ("://" in f or os.path.isabs(f)) for f in src.filenames]
    ids = [src.filenames[i] for i in keep]
    uris = [uris[i] for i in keep]
    labels = [src.labels[i] for i in keep]
    hashes, cache = _hash_all(uris, keep=pack, concurrency=concurrency)

    given = [src.splits[i] for i in keep] if src.splits is not None and not resplit else [None] * len(keep)
    for i, s in enumerate(given):
        if s is not None and s not in SPLITS:
            raise SourceError(f"{source}: row {src.rows[keep[i]]}: split {s!r} is not one of {SPLITS}")
    todo = [i for i, s in enumerate(given) if s is None]
    splits = list(given)
    if todo:
        index = {v: k for k, v in enumerate(src.vocab)}
        assigned = iterative_split(
            [[index[name] for name in labels[i]] for i in todo], len(src.vocab), parse_ratios(split),
            groups=[hashes[i] for i in todo], seed=seed,
        )
        for i, s in zip(todo, assigned):
            splits[i] = s

    meta = build_table(ids, stored_uris(uris, [given_relative[i] for i in keep], out, pack), labels,
                       splits=splits, content_hashes=hashes)
    stats = manifest_stats(meta, src.vocab)
    stats["source"] = source
    stats["missing_images"] = missing
    order = storage_order(splits, len(ids), seed).tolist()
    writer = ManifestWriter(out, src.vocab, row_order="random")
    try:
        with tqdm(total=len(order), desc="write manifest", unit="img", disable=None) as bar:
            for i in range(0, len(order), CHUNK):
                rows = order[i : i + CHUNK]
                chunk = meta.take(pa.array(rows))
                if pack:
                    data = [cache[r] for r in rows] if cache is not None else storage.fetch_many([uris[r] for r in rows], concurrency)
                    for r, d in zip(rows, data):
                        if isinstance(d, Exception):
                            raise SourceError(f"{uris[r]}: could not read image: {d}")
                    chunk = chunk.append_column("image", pa.array(data, pa.binary()))
                writer.write(chunk)
                bar.update(len(rows))
        files = writer.close(stats)
    except BaseException:
        writer.abort()
        raise
    return PrepareResult(files, stats, missing)

"""The manifest contract: Parquet rows of ``image_id, uri, labels[, split, image, content_hash]``.

The label vocabulary (its order defines multi-hot positions) travels in the schema
metadata under ``mlray.labels``, so a manifest read by any tool is self-describing.
A manifest is one Parquet file or a directory/prefix of them; ``write_manifest``
always writes a directory of ``part-*.parquet`` files plus ``_stats.json``.
``check_uris`` tells, before a job starts, whether the rows' images are where
their ``uri`` says.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlray.io import storage

LABELS_KEY = b"mlray.labels"
# "random": rows of each split are stored in a seeded random order (``mlray prepare``
# writes them so). Absent in manifests written in source order, e.g. by older versions.
ROW_ORDER_KEY = b"mlray.row_order"
SPLITS = ("train", "val", "test")
REQUIRED = {"image_id": pa.string(), "uri": pa.string(), "labels": pa.list_(pa.string())}
OPTIONAL = {"split": pa.string(), "image": pa.binary(), "content_hash": pa.string()}
COLUMN_ORDER = ("image_id", "uri", "labels", "split", "content_hash", "image")
STATS_FILE = "_stats.json"
URI_SAMPLE = 32  # rows whose image ``check_uris`` looks for, spread over the manifest

# Row groups of several MB: large GETs from object storage, and small enough that
# the training stream can read them as shuffle units in a fresh random order each
# epoch with little memory (``mlray.data.shuffle``).
PACKED_ROW_GROUP_BYTES = 8 << 20
PACKED_FILE_BYTES = 256 << 20
UNPACKED_ROWS_PER_FILE = 1_000_000
UNPACKED_ROW_GROUP_ROWS = 128_000


class ManifestError(ValueError):
    """The manifest breaks the contract; the message names the file, row or key."""


def schema_with_vocab(schema: pa.Schema, vocab: Sequence[str], row_order: str | None = None,
                      extra: dict[bytes, bytes] | None = None) -> pa.Schema:
    """``schema`` with the vocabulary (and row order, and ``extra`` keys) in its metadata."""
    meta = dict(schema.metadata or {})
    meta[LABELS_KEY] = json.dumps(list(vocab)).encode()
    if row_order is not None:
        meta[ROW_ORDER_KEY] = row_order.encode()
    meta.update(extra or {})
    return schema.with_metadata(meta)


def read_row_order(uri: str) -> str | None:
    """``"random"`` when the manifest's rows are stored shuffled within each split; None otherwise."""
    raw = (first_schema(uri).metadata or {}).get(ROW_ORDER_KEY)
    return raw.decode() if raw else None


def first_schema(uri: str) -> pa.Schema:
    """The schema of a manifest's (or a tag OUT's) first part: its columns and metadata."""
    return storage.read_schema(manifest_files(uri)[0])


def is_packed(uri: str) -> bool:
    """Whether the manifest carries its images' bytes (an ``image`` column)."""
    return "image" in first_schema(uri).names


def vocab_from_schema(schema: pa.Schema, source: str) -> list[str]:
    raw = (schema.metadata or {}).get(LABELS_KEY)
    if raw is None:
        raise ManifestError(
            f"{source}: schema metadata has no {LABELS_KEY.decode()!r} key; "
            "write manifests with `mlray prepare` (or add the vocabulary as a JSON list)"
        )
    vocab = json.loads(raw)
    if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab):
        raise ManifestError(f"{source}: {LABELS_KEY.decode()!r} must be a JSON list of strings")
    return vocab


def manifest_files(uri: str) -> list[str]:
    files = storage.list_files(uri, suffixes=(".parquet",))
    if not files:
        raise ManifestError(f"{uri}: no .parquet files found")
    return files


def read_vocab(uri: str) -> list[str]:
    return vocab_from_schema(first_schema(uri), uri)


def build_table(
    image_ids: Sequence[str],
    uris: Sequence[str],
    labels: Sequence[Sequence[str]],
    *,
    splits: Sequence[str | None] | None = None,
    content_hashes: Sequence[str | None] | None = None,
    images: Sequence[bytes | None] | None = None,
) -> pa.Table:
    cols: dict[str, pa.Array] = {
        "image_id": pa.array(image_ids, pa.string()),
        "uri": pa.array(uris, pa.string()),
        "labels": pa.array([list(x) for x in labels], pa.list_(pa.string())),
    }
    if splits is not None:
        cols["split"] = pa.array(splits, pa.string())
    if content_hashes is not None:
        cols["content_hash"] = pa.array(content_hashes, pa.string())
    if images is not None:
        cols["image"] = pa.array(images, pa.binary())
    return pa.table(cols)


def validate(
    table: pa.Table, vocab: Sequence[str], source: str, *, check_unique: bool = True, packed: bool | None = None
) -> None:
    """Check ``table`` against the contract; raise naming the column or row at fault."""
    for name, typ in REQUIRED.items():
        if name not in table.column_names:
            raise ManifestError(f"{source}: required column {name!r} is missing (has {table.column_names})")
    for name, typ in {**REQUIRED, **OPTIONAL}.items():
        if name in table.column_names and not table.schema.field(name).type.equals(typ):
            actual = table.schema.field(name).type
            if not (pa.types.is_large_string(actual) or pa.types.is_large_binary(actual) or pa.types.is_large_list(actual)):
                raise ManifestError(f"{source}: column {name!r} has type {actual}, the contract says {typ}")
    if len(set(vocab)) != len(vocab):
        dupes = sorted({v for v in vocab if list(vocab).count(v) > 1})
        raise ManifestError(f"{source}: vocabulary has duplicate labels {dupes}")
    ids = table.column("image_id")
    if ids.null_count:
        row = int(pc.index(pc.is_null(ids), True).as_py())
        raise ManifestError(f"{source}: row {row}: image_id is null")
    if check_unique and pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup_mask = pc.greater(counts.field("counts"), 1)
        dupes = counts.filter(dup_mask).field("values").to_pylist()
        raise ManifestError(
            f"{source}: {len(dupes)} duplicate image_id values, e.g. {dupes[:5]}; image_id must be unique"
        )
    packed = "image" in table.column_names if packed is None else packed
    if table.column("uri").null_count and not packed:
        row = int(pc.index(pc.is_null(table.column("uri")), True).as_py())
        raise ManifestError(f"{source}: row {row} ({ids[row].as_py()}): uri is null and no packed image")
    flat = pc.list_flatten(table.column("labels"))
    unknown = pc.unique(flat.filter(pc.invert(pc.is_in(flat, pa.array(list(vocab), pa.string())))))
    if len(unknown):
        raise ManifestError(
            f"{source}: labels not in the vocabulary: {unknown.to_pylist()[:10]} "
            f"(vocabulary has {len(vocab)} labels)"
        )
    if "split" in table.column_names:
        bad = pc.unique(table.column("split").drop_null())
        bad = [s for s in bad.to_pylist() if s not in SPLITS]
        if bad:
            raise ManifestError(f"{source}: unknown split values {bad}; use one of {SPLITS}")


def _order(table: pa.Table) -> pa.Table:
    return table.select([c for c in COLUMN_ORDER if c in table.column_names])


def storage_order(splits: Sequence[str | None] | None, n: int, seed: int = 0) -> np.ndarray:
    """The order rows are written in: train, val, test, unsplit (a reader filtering
    on ``split`` skips whole row groups by their statistics), and a seeded random
    order within each split. Label files usually list rows grouped by category;
    stored that way, every read of a slice of the manifest would see a few
    categories only."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if splits is None:
        return order
    rank = np.array([SPLITS.index(s) if s in SPLITS else len(SPLITS) for s in splits], dtype=np.int64)
    return order[np.argsort(rank[order], kind="stable")]


class ManifestWriter:
    """Streams rows into ``part-*.parquet`` files under ``out``.

    Packed rows are grouped into row groups of about ``PACKED_ROW_GROUP_BYTES``
    and files of about ``PACKED_FILE_BYTES``; memory holds one row group. Each
    file appears atomically when complete; ``close`` removes parts of an older
    manifest at ``out`` that this write did not replace. ``metadata``: more schema
    metadata keys (e.g. what ``prepare --fixes`` changed).
    """

    def __init__(self, out: str, vocab: Sequence[str], *, row_order: str | None = None,
                 metadata: dict[bytes, bytes] | None = None):
        self.out, self.vocab, self.row_order = out, list(vocab), row_order
        self.metadata = dict(metadata or {})
        self.files: list[str] = []
        self._stale = set(storage.list_files(out, (".parquet",))) if storage.exists(out) else set()
        self._buffer: list[pa.Table] = []
        self._buffered_rows = self._buffered_bytes = 0
        self._file_bytes = 0
        self._file_rows = 0
        self._stack: contextlib.ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None

    def write(self, table: pa.Table) -> None:
        validate(table, self.vocab, self.out, check_unique=False)
        table = _order(table).replace_schema_metadata(None)
        if self._schema is None:
            self._schema = schema_with_vocab(table.schema, self.vocab, self.row_order, self.metadata)
        table = table.cast(self._schema)
        packed = "image" in table.column_names
        limit_bytes = PACKED_ROW_GROUP_BYTES if packed else 1 << 62
        # A packed row group is the unit a training read task decodes: one written
        # table of thousands of images must still become many groups, or the whole
        # split would be decoded by one task.
        step = table.num_rows
        if packed and table.nbytes > limit_bytes:
            step = max(1, int(table.num_rows * limit_bytes / table.nbytes))
        for i in range(0, table.num_rows, step):
            piece = table.slice(i, step)
            if self._buffered_rows and self._buffered_bytes + piece.nbytes > limit_bytes:
                self._flush_row_group()
            self._buffer.append(piece)
            self._buffered_rows += piece.num_rows
            self._buffered_bytes += piece.nbytes
            if self._buffered_bytes >= limit_bytes or self._buffered_rows >= UNPACKED_ROW_GROUP_ROWS:
                self._flush_row_group()

    def _flush_row_group(self) -> None:
        if not self._buffered_rows:
            return
        group = pa.concat_tables(self._buffer).combine_chunks()
        self._buffer, self._buffered_rows, self._buffered_bytes = [], 0, 0
        if self._writer is None:
            uri = storage.join(self.out, f"part-{len(self.files):05d}.parquet")
            self._stack = contextlib.ExitStack()
            tmp = self._stack.enter_context(storage.atomic_local_file(uri, suffix=".parquet"))
            packed = "image" in group.column_names
            self._writer = pq.ParquetWriter(
                tmp, self._schema, compression="none" if packed else "zstd",
                # Encoded images don't compress; dictionary-encoding them only costs memory.
                use_dictionary=[c for c in group.column_names if c != "image"],
            )
            self.files.append(uri)
        self._writer.write_table(group, row_group_size=group.num_rows)
        self._file_bytes += group.nbytes
        self._file_rows += group.num_rows
        if self._file_bytes >= PACKED_FILE_BYTES or self._file_rows >= UNPACKED_ROWS_PER_FILE:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stack.close()  # moves the finished file into place
        self._writer, self._stack, self._file_bytes, self._file_rows = None, None, 0, 0

    def close(self, stats: dict | None = None) -> list[str]:
        self._flush_row_group()
        self._close_file()
        if not self.files:
            raise ManifestError(f"{self.out}: nothing to write (no rows)")
        for stale in self._stale - set(self.files):
            storage.delete(stale)
        if stats is not None:
            storage.write_text(storage.join(self.out, STATS_FILE), json.dumps(stats, indent=2))
        return self.files

    def abort(self) -> None:
        if self._stack is not None:
            self._writer.close()
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
        self._writer = self._stack = None


def write_manifest(
    table: pa.Table, vocab: Sequence[str], out: str, *, stats: dict | None = None, seed: int = 0
) -> list[str]:
    """Write an in-memory manifest table as a directory at ``out`` (rows in
    ``storage_order``); returns file URIs."""
    validate(table, vocab, out)
    writer = ManifestWriter(out, vocab, row_order="random")
    splits = table.column("split").to_pylist() if "split" in table.column_names else None
    table = table.take(pa.array(storage_order(splits, table.num_rows, seed)))
    step = 4096
    for i in range(0, max(table.num_rows, 1), step):
        writer.write(table.slice(i, step))
    return writer.close(stats)


def read_manifest(uri: str, *, with_images: bool = False, check: bool = True) -> tuple[pa.Table, list[str]]:
    """Read a manifest (file or directory, local or s3://) and its vocabulary.

    The packed ``image`` column is left out unless ``with_images``. Relative
    ``uri`` values are made absolute against the manifest's directory.
    """
    files = manifest_files(uri)
    vocab = read_vocab(uri)
    tables = []
    for f in files:
        try:
            names = storage.read_schema(f).names
            cols = names if with_images else [c for c in names if c != "image"]
            t = storage.read_table(f, columns=cols)
        except (OSError, pa.ArrowInvalid) as e:
            raise ManifestError(f"{f}: not a readable Parquet file: {e}") from e
        tables.append(t.replace_schema_metadata(None))
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as e:
        raise ManifestError(f"{uri}: parts have incompatible schemas: {e}") from e
    if check:
        validate(table, vocab, uri, packed="image" in names)
    return absolute_uris(table, manifest_base(uri)), vocab


def manifest_base(uri: str) -> str:
    """The directory that relative ``uri`` values of the manifest at ``uri`` are relative to.

    Local paths come back absolute: Ray workers resolve URIs in other working directories.
    """
    base = uri if storage.is_dir(uri) else storage.parent(uri)
    return base if "://" in base else storage.local_path(base)


# A relative URI with '.' or '..' segments ('../images/x.jpg' from `mlray prepare`
# when the images sit beside the manifest's directory).
_DOT_SEGMENT = r"(^|/)\.\.?(/|$)"


def absolute_uris(table: pa.Table, base: str) -> pa.Table:
    """``table`` with its relative ``uri`` values (the contract allows them) joined to ``base``.

    ``.``/``..`` segments are resolved, so ``../images/x.jpg`` reads the same from
    a local directory and from an S3 prefix (object stores take ``..`` literally).
    """
    if "uri" not in table.column_names:
        return table
    uris = table.column("uri")
    relative = pc.invert(pc.match_substring_regex(uris, r"^(/|[A-Za-z][A-Za-z0-9+.-]*://)"))
    if not pc.any(relative).as_py():
        return table
    fixed = pc.if_else(relative, pc.binary_join_element_wise(base.rstrip("/"), uris, "/"), uris)
    dotted = pc.and_(relative, pc.match_substring_regex(uris, _DOT_SEGMENT))
    if pc.any(dotted).as_py():
        rows = fixed.to_pylist()
        for i in pc.indices_nonzero(pc.fill_null(dotted, False)).to_pylist():
            try:
                rows[i] = storage.normalize(rows[i])
            except storage.StorageError as e:
                raise ManifestError(
                    f"manifest {base}: uri {uris[i].as_py()!r} resolves to {e}; "
                    "store absolute URIs for images outside the manifest's bucket"
                ) from e
        fixed = pa.array(rows, pa.string())
    return table.set_column(table.column_names.index("uri"), "uri", fixed)


def multi_hot(labels: pa.ListArray | pa.ChunkedArray, vocab: Sequence[str]) -> np.ndarray:
    """(N, C) uint8 targets from a list<string> column, in vocabulary order."""
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks() if labels.num_chunks != 1 else labels.chunk(0)
    n = len(labels)
    out = np.zeros((n, len(vocab)), dtype=np.uint8)
    flat = pc.list_flatten(labels)
    if len(flat) == 0:
        return out
    idx = pc.fill_null(pc.index_in(flat, pa.array(list(vocab), pa.string())), -1).to_numpy()
    rows = pc.list_parent_indices(labels).to_numpy()
    keep = idx >= 0
    out[rows[keep], idx[keep]] = 1
    return out


def _fully_packed(uri: str) -> bool:
    """Whether every row of the manifest carries its image bytes, from the Parquet
    footers' statistics (no image is read)."""
    for f in manifest_files(uri):
        fs, path = storage.resolve(f)
        meta = storage.retrying(lambda: pq.read_metadata(path, filesystem=fs), f)
        names = meta.schema.to_arrow_schema().names
        if "image" not in names:
            return False
        col = names.index("image")
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(col).statistics
            if stats is None or not stats.has_null_count or stats.null_count:
                return False
    return True


def check_uris(uri: str, table: pa.Table | None = None, *, splits: Sequence[str] | None = None,
               rows: np.ndarray | None = None, flag: str = "--manifest", sample: int = URI_SAMPLE) -> int:
    """Look for the images of ``sample`` rows spread evenly over the manifest (of
    ``splits`` only, when given) and raise ``ManifestError`` naming ``flag``, the
    first row whose image does not exist and the directory relative ``uri`` values
    are resolved against: a manifest written with paths relative to somewhere
    else fails here, not after a job has started. Rows that carry their bytes
    (packed) need no check. ``table``: the manifest as ``read_manifest`` gave it
    (absolute ``uri`` values), to avoid reading it again; ``rows``: a mask of its
    rows to sample from (those a job will read). Returns the rows checked."""
    has_images = "image" in first_schema(uri).names
    if has_images and _fully_packed(uri):
        return 0
    if table is None or (has_images and "image" not in table.column_names):
        # some rows packed, some not (not what `mlray prepare` writes): which is which takes the bytes
        table, _ = read_manifest(uri, with_images=has_images, check=False)
    rows = np.ones(table.num_rows, bool) if rows is None else np.asarray(rows, bool).copy()
    if splits is not None and "split" in table.column_names:
        rows = pc.is_in(table.column("split"), pa.array(list(splits), pa.string())).to_numpy(zero_copy_only=False)
    if "image" in table.column_names:
        rows &= pc.is_null(table.column("image")).to_numpy(zero_copy_only=False)
    uris = table.column("uri")
    rows &= pc.is_valid(uris).to_numpy(zero_copy_only=False)
    candidates = np.flatnonzero(rows)
    if not len(candidates):
        return 0
    picks = candidates[np.unique(np.linspace(0, len(candidates) - 1, min(sample, len(candidates))).round().astype(int))]
    wanted = [uris[int(i)].as_py() for i in picks]
    with concurrent.futures.ThreadPoolExecutor(min(16, len(wanted))) as pool:
        found = list(pool.map(storage.exists, wanted))
    for i, u, ok in zip(picks, wanted, found):
        if not ok:
            image_id = table.column("image_id")[int(i)].as_py()
            raise ManifestError(
                f"{flag} {uri}: row {int(i)} ({image_id}): {u} does not exist (the first missing of {len(picks)} rows "
                f"checked across the manifest); relative uri values are resolved against the manifest's directory, "
                f"{manifest_base(uri)}: write them relative to it, or absolute"
            )
    return len(picks)

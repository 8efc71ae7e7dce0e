"""What a tagging run has to do: which input ids OUT lacks, which it holds twice.

A nightly OUT grows to hundreds of millions of ids, so nothing here holds every
id on the driver or sends the done-set to every block. The ids are read once, by
Ray tasks, and hash-partitioned into buckets (OUT's ids and the input's alike);
one task per bucket then finds the bucket's new ids, its duplicates in OUT, and
(with ``--retry-errors``) the ids whose only row is a ``missing:`` error. The
driver keeps counts, the (usually few) duplicate records, and object refs of the
new rows, which become the dataset to tag without passing through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlray.io import storage
from mlray.io.tagged import OutFiles, write_part

ROWS_PER_BUCKET = 1_000_000
ROWS_PER_READ_TASK = 2_000_000


def _bucket_of(ids: pa.Array, n: int) -> np.ndarray:
    from pandas.util import hash_array

    return (hash_array(np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)) % np.uint64(n)).astype(np.int64)


def _split(table: pa.Table, n: int) -> list[pa.Table]:
    if n == 1:
        return [table]
    b = _bucket_of(table.column("image_id").combine_chunks(), n)
    order = np.argsort(b, kind="stable")
    bounds = np.searchsorted(b[order], np.arange(n + 1))
    sorted_t = table.take(pa.array(order))
    return [sorted_t.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n)]


def _read_out_ids(files: list[str], first_index: int, n: int) -> list[pa.Table]:
    """OUT's ids of some parts, split into ``n`` buckets: ``image_id, file, bad, missing``."""
    tables = []
    for k, uri in enumerate(files):
        t = storage.read_table(uri, columns=["image_id", "error"])
        err = t.column("error")
        tables.append(pa.table({
            "image_id": t.column("image_id"),
            "file": pa.array(np.full(t.num_rows, first_index + k, np.int32)),
            "bad": pc.is_valid(err),
            "missing": pc.fill_null(pc.starts_with(err, "missing:"), False),
        }))
    return _unwrap(_split(pa.concat_tables(tables) if tables else _empty_out(), n))


def _unwrap(parts: list[pa.Table]):
    """A task with ``num_returns=n`` returns n values, but with n == 1 the one value."""
    return parts if len(parts) > 1 else parts[0]


def _empty_out() -> pa.Table:
    return pa.table({"image_id": pa.array([], pa.string()), "file": pa.array([], pa.int32()),
                     "bad": pa.array([], pa.bool_()), "missing": pa.array([], pa.bool_())})


def _read_input_ids(source, columns: list[str], n: int) -> list[pa.Table]:
    """The input's rows (ids, and URIs where the input has them), split into ``n`` buckets."""
    if isinstance(source, pa.Table):
        table = source
    else:
        table = pa.concat_tables([storage.read_table(uri, columns=columns) for uri in source])
    return _unwrap(_split(table, n))


def _join_bucket(n_out: int, n_in: int, retry_errors: bool, keep_rows: bool, *parts: pa.Table):
    """One bucket: OUT's rows of it and the input's rows of it -> (new input rows, stats)."""
    out = pa.concat_tables(parts[:n_out]) if n_out else _empty_out()
    ins = pa.concat_tables(parts[n_out:n_out + n_in])
    ids = out.column("image_id")
    stats: dict = {"out_rows": out.num_rows, "in_rows": ins.num_rows, "dup_records": [], "retry_records": []}
    stats["in_duplicates"] = ins.num_rows - (pc.count_distinct(ins.column("image_id")).as_py() if ins.num_rows else 0)
    if out.num_rows:
        counts = out.group_by("image_id").aggregate([("image_id", "count")])
        dup_ids = counts.filter(pc.greater(counts.column("image_id_count"), 1)).column("image_id")
        if len(dup_ids):
            d = out.filter(pc.is_in(ids, value_set=dup_ids.combine_chunks()))
            stats["dup_records"] = list(zip(d.column("image_id").to_pylist(), d.column("file").to_pylist(),
                                            d.column("bad").to_pylist()))
    done_rows = out.filter(pc.invert(out.column("missing"))) if retry_errors else out
    done = pc.unique(done_rows.column("image_id").combine_chunks()) if done_rows.num_rows else pa.array([], pa.string())
    in_ids = ins.column("image_id")
    is_new = pc.invert(pc.is_in(in_ids, value_set=done)) if len(done) else pa.array(np.ones(ins.num_rows, bool))
    new = ins.filter(is_new)
    stats["new"] = new.num_rows
    if retry_errors and out.num_rows:
        stale = out.filter(pc.and_(out.column("missing"), pc.is_in(out.column("image_id"), value_set=new.column("image_id").combine_chunks())))
        stats["retry_records"] = list(zip(stale.column("image_id").to_pylist(), stale.column("file").to_pylist()))
    return (new if keep_rows else new.select(["image_id"])), stats


@dataclass
class Plan:
    rows_in: int
    input_duplicates: int
    skipped: int
    new: int
    new_refs: list = field(default_factory=list)  # object refs of pa.Tables of the rows to tag
    dup_records: list = field(default_factory=list)  # (image_id, file index, is error row)
    retry_records: list = field(default_factory=list)  # (image_id, file index) of missing: rows re-tagged now


def plan(out: OutFiles, *, listing: pa.Table | None, manifest_parts: list[str] | None, input_columns: list[str],
         retry_errors: bool = False, keep_rows: bool = True) -> Plan:
    """Partition OUT's ids and the input's into buckets and join them, in Ray tasks.
    With ``keep_rows`` the new rows (``input_columns``) stay in the object store as
    ``new_refs``; without, only their ids do (for ``keep_new``)."""
    import ray

    in_rows_hint = listing.num_rows if listing is not None else 0
    n = max(1, math.ceil((out.total + in_rows_hint) / ROWS_PER_BUCKET))
    if manifest_parts is not None:
        n = max(n, min(64, len(manifest_parts)))
    read_out = ray.remote(num_returns=n)(_read_out_ids)
    read_in = ray.remote(num_returns=n)(_read_input_ids)
    out_refs: list[list] = []
    group: list[str] = []
    rows = 0
    start = 0
    for i, (f, r) in enumerate(zip(out.files, out.rows)):
        group.append(f)
        rows += r
        if rows >= ROWS_PER_READ_TASK or i == len(out.files) - 1:
            refs = read_out.remote(group, start, n)
            out_refs.append(refs if n > 1 else [refs])
            start, group, rows = i + 1, [], 0
    in_refs: list[list] = []
    if listing is not None:
        step = ROWS_PER_READ_TASK
        for s in range(0, max(listing.num_rows, 1), step):
            refs = read_in.remote(listing.slice(s, step), input_columns, n)
            in_refs.append(refs if n > 1 else [refs])
    else:
        per_task = max(1, len(manifest_parts) // 64)
        for s in range(0, len(manifest_parts), per_task):
            refs = read_in.remote(manifest_parts[s:s + per_task], input_columns, n)
            in_refs.append(refs if n > 1 else [refs])
    join = ray.remote(num_returns=2)(_join_bucket)
    results = [
        join.remote(len(out_refs), len(in_refs), retry_errors, keep_rows,
                    *[r[b] for r in out_refs], *[r[b] for r in in_refs])
        for b in range(n)
    ]
    stats = ray.get([s for _, s in results])
    p = Plan(rows_in=sum(s["in_rows"] for s in stats), input_duplicates=sum(s["in_duplicates"] for s in stats),
             skipped=0, new=sum(s["new"] for s in stats))
    p.skipped = p.rows_in - p.new
    p.new_refs = [t for (t, _), s in zip(results, stats) if s["new"]]
    for s in stats:
        p.dup_records += s["dup_records"]
        p.retry_records += s["retry_records"]
    return p


def keep_new(batch: pa.Table, new_refs: list) -> pa.Table:
    """Ray Data UDF for inputs whose rows cannot travel as plan output (packed
    manifests carry image bytes): keep the rows the plan found new."""
    ids = _new_ids(tuple(new_refs))
    return batch.filter(pc.is_in(batch.column("image_id"), value_set=ids))


_NEW_CACHE: dict = {}


def _new_ids(refs: tuple) -> pa.Array:
    import ray

    key = tuple(r.hex() for r in refs)
    if key not in _NEW_CACHE:
        _NEW_CACHE.clear()
        tables = ray.get(list(refs))
        _NEW_CACHE[key] = pc.unique(pa.concat_tables([t.select(["image_id"]) for t in tables]).column("image_id").combine_chunks())
    return _NEW_CACHE[key]


def drop_rows(out: OutFiles, drop: dict[int, set[str]]) -> int:
    """Rewrite each part of OUT named in ``drop`` (file index -> ids) without those
    ids: the new part is written (atomically, named by its ids) before the old one
    is deleted, so a crash in between leaves a duplicate for the next run to
    repair, never a lost row. Returns the rows dropped."""
    dropped = 0
    for k, ids in sorted(drop.items()):
        uri = out.files[k]
        t = storage.read_table(uri)
        keep = t.filter(pc.invert(pc.is_in(t.column("image_id"), value_set=pa.array(sorted(ids), pa.string()))))
        keep = _first_per_id(keep)
        dropped += t.num_rows - keep.num_rows
        new_uri = write_part(storage.parent(uri), keep) if keep.num_rows else None
        if new_uri != uri:
            storage.delete(uri)
    return dropped


def _first_per_id(t: pa.Table) -> pa.Table:
    """One row per id inside one part (a scored row first, then file order)."""
    if pc.count_distinct(t.column("image_id")).as_py() == t.num_rows:
        return t
    order = sorted(range(t.num_rows), key=lambda i: (t.column("error")[i].is_valid, i))
    seen: set[str] = set()
    rows = []
    for i in order:
        image_id = t.column("image_id")[i].as_py()
        if image_id not in seen:
            seen.add(image_id)
            rows.append(i)
    return t.take(pa.array(sorted(rows)))


def choose_duplicates(out: OutFiles, records: list) -> dict[int, set[str]]:
    """For each id OUT holds more than once, the rows to drop: a scored row beats
    an error row, then the part whose name sorts first wins (deterministic)."""
    by_id: dict[str, list] = {}
    for image_id, k, bad in records:
        by_id.setdefault(image_id, []).append((bool(bad), out.files[k], k))
    drop: dict[int, set[str]] = {}
    for image_id, rows in by_id.items():
        rows.sort()
        keeper = rows[0][2]
        for _, _, k in rows[1:]:
            # a second row in the keeper's own part is deduplicated inside that part
            drop.setdefault(k, set()).update(() if k == keeper else (image_id,))
    return drop

"""Ray Data pipelines: manifest rows -> decoded fixed-size uint8 images (+ targets).

    read_parquet (split pushed down) -> streaming re-blocking -> fetch + decode (CPU tasks)

Bytes come from the packed ``image`` column when present, else from ``uri``
through the storage layer, with ``fetch_concurrency`` threads inside each decode
task. Ray Data's own ``download()`` expression was considered and not used: it
turns a failed read into a bare null (the reason only reaches a debug log, and
the tagging job must write the reason into its ``error`` column), and it plans a
metadata actor pool that issues an extra HEAD request per object, which on a
2-CPU machine competes with decoding. Fetching inside the decode task also keeps
the encoded bytes out of the object store.

Rows that cannot be decoded are *kept*, with an ``error`` string and a zero
image: training counts and skips them, tagging writes them as error rows. Images
leave the CPU stream as uint8 (4x smaller than float); normalisation and
augmentation happen on the training device (``mlray.model.augment``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from mlray.io import storage
from mlray.data.images import DEFAULT_MAX_PIXELS, decode_many
from mlray.data.shuffle import shuffled_split
from mlray.io.manifest import absolute_uris, first_schema, manifest_base, manifest_files, multi_hot
from mlray.io.tagged import RETRYABLE


def _string_array(values: Sequence[str | None]) -> np.ndarray:
    return np.array(["" if v is None else v for v in values], dtype=object)


def _fetch(batch: pa.Table, fetch_concurrency: int) -> tuple[list, list[str | None]]:
    """Each row's encoded bytes (packed, or fetched by URI) and fetch error (None when fetched)."""
    if "image" in batch.column_names and batch.column("image").null_count < batch.num_rows:
        data: list = batch.column("image").to_pylist()
    else:
        data = [None] * batch.num_rows
    errors: list[str | None] = [None] * batch.num_rows
    if "uri" in batch.column_names:
        uris = batch.column("uri").to_pylist()
        todo = [i for i, d in enumerate(data) if d is None and uris[i] is not None]
        for i, got in zip(todo, storage.fetch_many([uris[i] for i in todo], fetch_concurrency)):
            if isinstance(got, Exception):
                reason = RETRYABLE if storage.is_transient(got) else "missing"
                errors[i] = f"{reason}: {got}"
            else:
                data[i] = got
    return data, errors


def fetch_rows(batch: pa.Table, *, fetch_concurrency: int = 16, keep: Sequence[str] = ("image_id",),
               vocab: Sequence[str] | None = None) -> pa.Table:
    """One Ray Data batch, fetched but not decoded (decode ``device``): ``encoded``
    bytes (null where the fetch failed), ``error`` ("" when fetched), ``keep``, and
    ``target`` (N, C) uint8 when ``vocab`` is given."""
    data, errors = _fetch(batch, fetch_concurrency)
    cols = {"encoded": pa.array(data, pa.binary()), "error": pa.array(["" if e is None else e for e in errors])}
    for name in keep:
        cols[name] = pa.array(_string_array(batch.column(name).to_pylist()), pa.string())
    if vocab is not None:
        from ray.data.extensions import ArrowTensorArray

        cols["target"] = ArrowTensorArray.from_numpy(multi_hot(batch.column("labels"), vocab))
    return pa.table(cols)


def decode_rows(
    batch: pa.Table,
    *,
    size: int,
    vocab: Sequence[str] | None = None,
    fetch_concurrency: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep: Sequence[str] = ("image_id",),
) -> dict[str, np.ndarray]:
    """One Ray Data batch: fetch (if not packed) and decode.

    Returns ``image`` (N, size, size, 3) uint8, ``error`` ("" when decoded), the
    ``keep`` columns, and ``target`` (N, C) uint8 when ``vocab`` is given.
    """
    data, errors_fetch = _fetch(batch, fetch_concurrency)
    images, errors = decode_many(data, size, max_pixels=max_pixels)
    errors = [f or e for f, e in zip(errors_fetch, errors)]
    out = {"image": images, "error": _string_array(errors)}
    for name in keep:
        out[name] = _string_array(batch.column(name).to_pylist())
    if vocab is not None:
        out["target"] = multi_hot(batch.column("labels"), vocab)
    return out


def read_manifest_dataset(manifest: str, split: str | Sequence[str] | None, columns: Sequence[str]):
    """A Ray Dataset over a manifest's rows in stored order, filtered to ``split`` (one
    name or several; pushed down to the Parquet scan, which skips row groups of
    other splits). Training reads through ``mlray.data.shuffle`` instead."""
    import ray.data
    from ray.data.expressions import col

    files = manifest_files(manifest)
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    schema_cols = set(first_schema(manifest).names)
    cols = [c for c in columns if c in schema_cols]
    if split is not None and "split" in schema_cols:
        cols = list(dict.fromkeys([*cols, "split"]))
    ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None).select_columns(cols)
    if split is not None:
        if "split" not in schema_cols:
            raise ValueError(f"{manifest}: no 'split' column, so split {split!r} cannot be selected")
        ds = ds.filter(expr=col("split") == split if isinstance(split, str) else col("split").is_in(list(split)))
    return with_absolute_uris(ds, manifest) if "uri" in cols else ds


def with_absolute_uris(ds, manifest: str):
    return ds.map_batches(absolute_uris, batch_format="pyarrow", fn_kwargs={"base": manifest_base(manifest)},
                          zero_copy_batch=True)


def decode_dataset(
    ds,
    *,
    size: int,
    vocab: Sequence[str] | None,
    decode_batch_size: int = 128,
    fetch_concurrency: int = 16,
    keep: Sequence[str] = ("image_id",),
    decode_num_cpus: float = 1.0,
    reblock: bool = True,
    decode: str = "cpu",
):
    """Fetch and decode the rows of any dataset with ``image_id``, ``uri`` and
    optionally ``image`` columns (a manifest, or a listing of image files). With
    ``decode="device"`` the rows are fetched only: the consumer decodes the
    ``encoded`` bytes next to its model (``mlray.model.device_decode``)."""
    if reblock:  # pass False when every block holds at most ``decode_batch_size`` rows
        ds = ds.repartition(target_num_rows_per_block=decode_batch_size)
    # Blocks already cut to size go through whole (batch_size=None): a minimum batch
    # size would keep Ray Data from fusing the decode into the read task before it.
    batch = decode_batch_size if reblock else None
    if decode == "device":
        fn, kwargs = fetch_rows, {"fetch_concurrency": fetch_concurrency, "keep": tuple(keep), "vocab": vocab}
    else:
        fn, kwargs = decode_rows, {"size": size, "vocab": vocab, "fetch_concurrency": fetch_concurrency,
                                   "keep": tuple(keep)}
    return ds.map_batches(fn, batch_size=batch, batch_format="pyarrow", num_cpus=decode_num_cpus, fn_kwargs=kwargs)


def image_dataset(
    manifest: str, split: str | Sequence[str] | None, *, keep: Sequence[str] = ("image_id",),
    shuffle: bool = False, seed: int = 0, **kw,
):
    """Decoded images of one split of a manifest, as a lazy Ray Dataset. With
    ``shuffle``, every epoch streams the rows in a new random order that mixes
    the whole split, whatever order the manifest stores them in (``mlray.data.shuffle``)."""
    columns = ["image_id", "uri", "labels", "image", *keep]
    if not shuffle:
        return decode_dataset(read_manifest_dataset(manifest, split, columns), keep=keep, **kw)
    ds = shuffled_split(manifest, split, columns, block_rows=kw.get("decode_batch_size", 128), seed=seed)
    return decode_dataset(ds, keep=keep, reblock=False, **kw)


def torch_collate():
    """For ``iter_torch_batches``: numeric columns become tensors, while the id and
    error strings stay numpy (torch has no string tensors). Ray hands out
    read-only views of the object store; they are copied (a few MB a batch)
    so the tensors are ordinary writable ones."""
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict:
            return {
                k: (v if v.dtype == object else torch.from_numpy(np.require(v, requirements="W")))
                for k, v in batch.items()
            }

    return Collate()

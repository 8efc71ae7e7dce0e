"""A fresh random row order every epoch over one split of any manifest, streamed.

Label files list rows grouped by category, and a manifest keeps whatever order
it was written in. Shuffling only file order and rows inside a decode batch then
trains on near-single-category batches, in almost the same order every epoch,
and a fine-tune collapses once the backbone unfreezes. Ray Data's
``random_shuffle`` / ``randomize_block_order`` would fix the order, but they are
all-to-all barriers that hold the epoch in the object store before the first
batch. This module shuffles without one:

``ShuffledSplit`` plans a Ray Data datasource (``mlray.data.readtasks``), and
Ray Data asks a datasource for its read tasks each time a dataset executes,
i.e. once per epoch. Each call draws a new permutation (seeded by ``seed`` and
the call count):

* unpacked manifests (rows are ids, URIs and labels, ~100 bytes): the split's
  rows are held here and dealt out in a globally permuted order, ``block_rows``
  to a read task. A full shuffle, whatever the stored order.
* packed manifests (encoded images inside the Parquet file): the bytes stay in
  storage. The unit is a slice of a row group; the units are permuted and each
  read task reads its row groups once, mixes its rows and yields blocks of
  ``block_rows``. Manifests written by ``mlray prepare`` store each split in
  random order (schema key ``mlray.row_order``), so a whole row group is a unit,
  a read task takes random row groups holding ``MIN_TASK_BLOCKS`` blocks of rows
  or more, and every byte is read once an epoch. Older manifests, stored in source order,
  are cut into slices of at most 1/``LEGACY_READS`` of a row group,
  ``LEGACY_UNITS_PER_TASK`` slices from random places make one read task, and
  each training worker mixes what arrives in a local buffer of decoded images
  (``data.shuffle_buffer_mb``, on by default for these manifests only). That
  costs up to ``LEGACY_READS``x the reads and the buffer's memory; one line in the
  log says so, and that re-running ``mlray prepare`` removes both.

Memory: a read task holds the encoded bytes of its row groups (a few x 8 MB);
the optional worker buffer is sized in bytes of decoded images, not rows.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlray.io import storage
from mlray.data.readtasks import read_dataset, row_read_tasks
from mlray.io.manifest import absolute_uris, is_packed, manifest_base, manifest_files, read_manifest, read_row_order

log = logging.getLogger(__name__)

LEGACY_READS = 8
LEGACY_UNITS_PER_TASK = 8
# A read task (read + decode, fused) covers whole row groups holding at least this
# many blocks of rows. Each task ends in a round trip through the driver before the
# next one starts; with one ~8 MB row group of photos per task (~110 rows, 0.25 s
# of decoding) that gap cost ~20% of a 2-core machine's decode throughput.
MIN_TASK_BLOCKS = 2
DEFAULT_BUFFER_MB = 64.0


def _split_rows(pf: pq.ParquetFile, group: int, split: str | Sequence[str] | None) -> np.ndarray:
    """Row numbers inside one row group that belong to ``split``."""
    n = pf.metadata.row_group(group).num_rows
    if split is None or "split" not in pf.schema_arrow.names:
        return np.arange(n)
    values = pf.read_row_group(group, columns=["split"]).column("split")
    wanted = [split] if isinstance(split, str) else list(split)
    return np.flatnonzero(pc.fill_null(pc.is_in(values, pa.array(wanted)), False).to_numpy(zero_copy_only=False))


def _read_units(paths: list[str], fs, units: list[tuple[int, int, np.ndarray]], columns: list[str],
                block_rows: int, seed: int, base: str) -> Iterator[pa.Table]:
    """Read each row group named in ``units`` once, keep the units' rows, mix them, yield blocks
    (relative URIs made absolute against ``base``)."""
    by_file: dict[int, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for f, g, rows in units:
        by_file[f][g].append(rows)
    parts = []
    for f, groups in by_file.items():
        pf = pq.ParquetFile(paths[f], filesystem=fs)
        cols = [c for c in columns if c in pf.schema_arrow.names]
        for g, row_lists in groups.items():
            table = pf.read_row_group(g, columns=cols).replace_schema_metadata(None)
            parts.append(table.take(pa.array(np.concatenate(row_lists))))
    table = pa.concat_tables(parts, promote_options="permissive")
    table = table.take(pa.array(np.random.default_rng(seed).permutation(table.num_rows)))
    table = absolute_uris(table, base)
    for i in range(0, table.num_rows, block_rows):
        yield table.slice(i, block_rows)


def stored_in_source_order(manifest: str) -> bool:
    """A packed manifest whose rows are not stored shuffled: the stream alone mixes
    it less well, so workers add a local buffer by default."""
    return is_packed(manifest) and read_row_order(manifest) != "random"


def local_buffer_rows(manifest: str, image_size: int, buffer_mb: float | None) -> int | None:
    """Rows of the worker's local shuffle buffer: ``buffer_mb`` of decoded
    ``image_size`` images; ``None`` (auto) is ``DEFAULT_BUFFER_MB`` for manifests
    stored in source order and off otherwise; 0 is off."""
    if buffer_mb is None:
        buffer_mb = DEFAULT_BUFFER_MB if stored_in_source_order(manifest) else 0.0
    rows = int(buffer_mb * 2**20 / (image_size * image_size * 3))
    return rows or None


class ShuffledSplit:
    """Planner (``mlray.data.readtasks``) of one split of a manifest, in a new random
    order each time Ray Data asks for its read tasks (once an epoch)."""

    name = "ShuffledSplit"

    def __init__(self, manifest: str, split, columns: list[str], *, block_rows: int, seed: int):
        self.block_rows, self.seed, self.calls = block_rows, seed, 0
        self.base = manifest_base(manifest)
        files = manifest_files(manifest)
        self.fs, _ = storage.resolve(files[0])
        self.paths = [storage.resolve(f)[1] for f in files]
        first = pq.ParquetFile(self.paths[0], filesystem=self.fs)
        self.packed = "image" in first.schema_arrow.names
        self.columns = [c for c in dict.fromkeys(columns) if c in first.schema_arrow.names]
        self.table = self.table_ref = None
        self.units: list[tuple[int, int, np.ndarray]] = []
        self.units_per_task = 1
        if not self.packed:
            table, _ = read_manifest(manifest, check=False)
            if split is not None and "split" in table.column_names:
                wanted = [split] if isinstance(split, str) else list(split)
                table = table.filter(pc.fill_null(pc.is_in(table.column("split"), pa.array(wanted)), False))
            self.table = table.select(self.columns)
            self.size = self.table.nbytes
            return
        legacy = read_row_order(manifest) != "random"
        self.size = 0
        largest = 0
        for f, path in enumerate(self.paths):
            pf = pq.ParquetFile(path, filesystem=self.fs)
            for g in range(pf.metadata.num_row_groups):
                rows = _split_rows(pf, g, split)
                if not len(rows):
                    continue
                meta = pf.metadata.row_group(g)
                self.size += int(meta.total_byte_size * len(rows) / max(meta.num_rows, 1))
                largest = max(largest, len(rows))
                step = max(block_rows // LEGACY_UNITS_PER_TASK, math.ceil(len(rows) / LEGACY_READS)) \
                    if legacy else len(rows)
                self.units += [(f, g, rows[i : i + step]) for i in range(0, len(rows), step)]
        self.n_rows = sum(len(u[2]) for u in self.units)
        if legacy and largest > block_rows // LEGACY_UNITS_PER_TASK:
            self.units_per_task = LEGACY_UNITS_PER_TASK
            log.warning(
                "%s was written in source order (before mlray stored rows shuffled): each epoch mixes "
                "slices of its row groups, reading them up to %dx; re-run `mlray prepare` to read it once",
                manifest, LEGACY_READS,
            )
        elif not legacy and self.units:
            typical = float(np.median([len(u[2]) for u in self.units]))
            self.units_per_task = max(1, math.ceil(MIN_TASK_BLOCKS * block_rows / typical))

    def num_tasks(self) -> int:
        if self.table is not None:
            return max(1, math.ceil(self.table.num_rows / self.block_rows))
        return max(1, math.ceil(len(self.units) / self.units_per_task))

    def size_bytes(self) -> int:
        return self.size

    def next_order(self) -> tuple[np.random.Generator, np.ndarray]:
        """This call's generator and permutation (of rows, unpacked; of units, packed)."""
        self.calls += 1
        rng = np.random.default_rng([self.seed, self.calls])
        return rng, rng.permutation(self.table.num_rows if self.table is not None else len(self.units))

    def read_tasks(self, per_task_row_limit=None) -> list:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        rng, order = self.next_order()
        if self.table is not None:
            import ray

            if self.table_ref is None:  # the rows go to the object store once, not into every task
                self.table_ref = ray.put(self.table)
            rows = [order[i : i + self.block_rows] for i in range(0, len(order), self.block_rows)]
            return row_read_tasks(self.table, self.table_ref, rows, per_task_row_limit)
        tasks = []
        for i in range(0, len(order), self.units_per_task):
            units = [self.units[j] for j in order[i : i + self.units_per_task]]
            rows = sum(len(u[2]) for u in units)
            meta = BlockMetadata(num_rows=rows, size_bytes=int(self.size * rows / max(self.n_rows, 1)),
                                 input_files=None, exec_stats=None)
            args = (self.paths, self.fs, units, self.columns, self.block_rows, int(rng.integers(1 << 31)), self.base)
            tasks.append(ReadTask(lambda a=args: _read_units(*a), meta, per_task_row_limit=per_task_row_limit))
        return tasks


def shuffled_split(manifest: str, split: str | Sequence[str] | None, columns: Sequence[str], *,
                   block_rows: int = 128, seed: int = 0):
    """A Ray Dataset over one split of ``manifest`` whose rows come in a new random
    order every time it executes (every epoch). Blocks hold at most ``block_rows`` rows,
    and relative URIs are made absolute."""
    return read_dataset(ShuffledSplit(manifest, split, list(columns), block_rows=block_rows, seed=seed))

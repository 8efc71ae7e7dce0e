"""Ray Data read tasks planned by mlray: one datasource shape for every stream it plans itself.

Two streams know their rows before Ray does: a listing of image files (tagging)
and one split of a manifest in a fresh random order each epoch (training,
``mlray.data.shuffle``). Each is a plain planner object (``name``,
``num_tasks()``, ``size_bytes()``, ``read_tasks(per_task_row_limit)``), testable
without Ray; ``read_dataset`` turns one into a Ray Dataset. Ray Data asks a
datasource for its read tasks each time the dataset executes, so a planner is
asked once per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


def row_read_tasks(table: pa.Table, table_ref, row_lists: Sequence[np.ndarray], per_task_row_limit=None) -> list:
    """Ray Data read tasks, one per array of row numbers of ``table`` (already in
    the object store as ``table_ref``, so the rows travel once, not in every task)."""
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    per_row = table.nbytes / max(table.num_rows, 1)
    tasks = []
    for rows in row_lists:
        meta = BlockMetadata(num_rows=len(rows), size_bytes=int(per_row * len(rows)), input_files=None, exec_stats=None)
        tasks.append(ReadTask(lambda ref=table_ref, r=rows: [ray.get(ref).take(pa.array(r))], meta,
                              per_task_row_limit=per_task_row_limit))
    return tasks


class TableRows:
    """Planner: an in-memory table (a listing of image files) in order, ``block_rows``
    rows per read task. ``ray.data.from_arrow`` would run a Ray task per block to
    plan it, which waits for a worker process before the first image; these reads
    also fuse with the decode after them."""

    name = "Table"

    def __init__(self, table: pa.Table, block_rows: int):
        self.table, self.block_rows, self.ref = table, block_rows, None

    def num_tasks(self) -> int:
        return max(1, -(-self.table.num_rows // self.block_rows))

    def size_bytes(self) -> int:
        return self.table.nbytes

    def row_lists(self) -> list[np.ndarray]:
        n = self.table.num_rows
        return [np.arange(i, min(i + self.block_rows, n)) for i in range(0, n, self.block_rows)]

    def read_tasks(self, per_task_row_limit=None) -> list:
        import ray

        if self.ref is None:  # the rows go to the object store once, not into every task
            self.ref = ray.put(self.table)
        return row_read_tasks(self.table, self.ref, self.row_lists(), per_task_row_limit)


_DATASOURCE = None


def _datasource_class():
    """A Ray Data datasource that asks a planner; built on first use, so that
    importing this module does not import Ray Data."""
    global _DATASOURCE
    if _DATASOURCE is None:
        from ray.data.datasource import Datasource

        class PlannedRows(Datasource):
            def __init__(self, planner):
                super().__init__()
                self.planner = planner

            def estimate_inmemory_data_size(self) -> int:
                return self.planner.size_bytes()

            def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
                return self.planner.read_tasks(per_task_row_limit)

            def get_name(self) -> str:
                return self.planner.name

        _DATASOURCE = PlannedRows
    return _DATASOURCE


def read_dataset(planner):
    """A Ray Dataset whose read tasks come from ``planner``. As many blocks as read
    tasks: asked for more, Ray Data would split every read task's output, and a
    split read cannot fuse with the decode that follows."""
    import ray.data

    return ray.data.read_datasource(_datasource_class()(planner), override_num_blocks=planner.num_tasks())


def table_dataset(table: pa.Table, block_rows: int):
    """A Ray Dataset over an in-memory table, in order, ``block_rows`` rows per read task."""
    return read_dataset(TableRows(table, block_rows))

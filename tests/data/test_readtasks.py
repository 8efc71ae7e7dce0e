"""The planner of a listing's read tasks, without Ray: rows in order, ``block_rows`` a task, each once."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mlray.data.readtasks import TableRows


def test_a_listing_is_read_in_order_block_rows_a_task():
    table = pa.table({"image_id": [f"{i}.jpg" for i in range(10)], "uri": [f"/x/{i}.jpg" for i in range(10)]})
    planner = TableRows(table, 4)
    rows = planner.row_lists()
    assert [r.tolist() for r in rows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert planner.num_tasks() == len(rows) == 3 and planner.size_bytes() == table.nbytes
    assert np.concatenate(rows).tolist() == list(range(10))  # every row once, in order
    exact = TableRows(table, 5)
    assert [len(r) for r in exact.row_lists()] == [5, 5] and exact.num_tasks() == 2
    one = TableRows(table, 100)
    assert [r.tolist() for r in one.row_lists()] == [list(range(10))] and one.num_tasks() == 1
    empty = TableRows(table.slice(0, 0), 4)
    assert empty.row_lists() == [] and empty.num_tasks() == 1  # Ray Data wants at least one task

"""The tagging plan's join and repair, without Ray: the functions its Ray tasks run,
called in order on real Parquet parts of a tag OUT, give the new ids, the ids OUT
holds twice and the ``missing:`` rows to retry; the repair leaves one row per id."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
from tag_outs import part

from mlray.io.tagged import OutFiles, out_files, write_part
from mlray.tagging.plan import (_first_per_id, _join_bucket, _read_input_ids, _read_out_ids, _split, choose_duplicates,
                                 drop_rows)


def _ids(table: pa.Table) -> list[str]:
    return table.column("image_id").to_pylist()


def test_an_id_lands_in_the_same_bucket_whichever_table_it_comes_from():
    """OUT's ids and the input's are bucketed apart; the join is right only when an
    id meets itself in one bucket."""
    ids = [f"img_{i:04d}.jpg" for i in range(500)]
    out = pa.table({"image_id": ids[:300], "file": list(range(300))})
    inp = pa.table({"image_id": ids[::-1], "uri": [f"/x/{i}" for i in ids[::-1]]})
    a, b = _split(out, 7), _split(inp, 7)
    assert len(a) == len(b) == 7
    assert sorted(sum((_ids(t) for t in a), [])) == ids[:300]  # every row once
    assert sorted(sum((_ids(t) for t in b), [])) == ids
    bucket = {i: k for k, t in enumerate(b) for i in _ids(t)}
    assert all(bucket[i] == k for k, t in enumerate(a) for i in _ids(t))
    assert sum(t.num_rows > 0 for t in b) > 3  # spread, not all in one
    # rows keep their other columns
    assert all(u == f"/x/{i}" for t in b for i, u in zip(_ids(t), t.column("uri").to_pylist()))
    assert _split(inp, 1) == [inp]


def _plan(out: str, inp: pa.Table, n: int, *, retry_errors=False, keep_rows=True):
    """The plan's tasks, run here: read OUT's parts and the input into ``n`` buckets, join each."""
    state = out_files(out)
    out_parts = _read_out_ids(state.files, 0, n)
    in_parts = _read_input_ids(inp, ["image_id", "uri"], n)
    if n == 1:
        out_parts, in_parts = [out_parts], [in_parts]
    results = [_join_bucket(1, 1, retry_errors, keep_rows, out_parts[b], in_parts[b]) for b in range(n)]
    new = pa.concat_tables([t for t, _ in results])
    stats = {k: sum((s[k] for _, s in results), [] if k.endswith("records") else 0) for k in results[0][1]}
    return state, new, stats


def _out(tmp_path):
    """OUT with a scored ``b`` in two parts, an error row of ``b`` in a third, and ``c`` recorded missing."""
    out = str(tmp_path / "out")
    part(out, [("a", None), ("b", None), ("c", "missing: not there yet")])
    part(out, [("b", "decode: truncated"), ("d", None)])
    part(out, [("b", None), ("e", None)])
    return out


def _input(*ids):
    return pa.table({"image_id": list(ids), "uri": [f"/images/{i}" for i in ids]})


def test_join_finds_new_ids_duplicates_and_the_missing_rows_to_retry(tmp_path):
    out = _out(tmp_path)
    inp = _input("a", "b", "c", "f", "g")
    for n in (1, 3):
        state, new, stats = _plan(out, inp, n)
        held = {k: set(_ids(pq.read_table(f))) for k, f in enumerate(state.files)}
        assert sorted(_ids(new)) == ["f", "g"] and stats["new"] == 2
        assert sorted(new.column("uri").to_pylist()) == ["/images/f", "/images/g"]  # the input's rows, not just ids
        assert stats["out_rows"] == 7 and stats["in_rows"] == 5 and stats["in_duplicates"] == 0
        # every row of b, with its part, and whether it is an error row
        with_error = next(k for k, ids in held.items() if "d" in ids)
        assert sorted((k, bad) for _, k, bad in stats["dup_records"]) == [(k, k == with_error) for k in range(3)]
        assert {i for i, _, _ in stats["dup_records"]} == {"b"}
        assert stats["retry_records"] == []  # c is done unless errors are retried
        # --retry-errors: c is new again, and its missing: row is to be dropped from its part
        _, new, stats = _plan(out, inp, n, retry_errors=True)
        assert sorted(_ids(new)) == ["c", "f", "g"]
        (rid, k), = stats["retry_records"]
        assert rid == "c" and "c" in _ids(pq.read_table(state.files[k]))
        # without keep_rows only the ids travel (the input's rows stay in storage)
        _, new, _ = _plan(out, inp, n, keep_rows=False)
        assert new.column_names == ["image_id"] and sorted(_ids(new)) == ["f", "g"]
    _, _, stats = _plan(out, _input("f", "f", "g"), 2)
    assert stats["in_duplicates"] == 1  # counted: the job refuses an input with duplicate ids


def test_first_run_has_everything_new_and_an_empty_out(tmp_path):
    _, new, stats = _plan(str(tmp_path / "none"), _input("x", "y"), 2)
    assert sorted(_ids(new)) == ["x", "y"] and stats["out_rows"] == 0 and stats["dup_records"] == []


def test_a_scored_row_beats_an_error_row_then_the_part_whose_name_sorts_first():
    # file indices out of name order: the choice follows names, not indices
    state = OutFiles(["/o/part-c.parquet", "/o/part-a.parquet", "/o/part-b.parquet"], [9, 9, 9], set(), {})
    records = [
        ("x", 1, True), ("x", 2, False),  # the error row goes, whatever its part's name
        ("y", 0, False), ("y", 2, False), ("y", 1, False),  # part-a keeps it
        ("z", 2, False), ("z", 2, False),  # twice in one part: that part is rewritten with one
    ]
    assert choose_duplicates(state, records) == {1: {"x"}, 0: {"y"}, 2: {"y"}}
    assert choose_duplicates(state, records[-2:]) == {2: set()}  # listed, so its own copy of z goes
    assert choose_duplicates(state, []) == {}


def test_one_row_per_id_inside_a_part_scored_first_then_file_order():
    t = pa.table({
        "image_id": ["x", "y", "x", "z", "x", "y"],
        "error": ["decode: bad", None, None, None, None, "missing: gone"],
        "n": [0, 1, 2, 3, 4, 5],
    })
    kept = _first_per_id(t)
    assert kept.column("n").to_pylist() == [1, 2, 3]  # x: its first scored row; y: scored over missing
    unique = t.slice(1, 3)
    assert _first_per_id(unique) is unique


def test_repair_leaves_one_row_per_id_and_loses_none(tmp_path):
    """The join's duplicates and retries, dropped from real parts: each id once, the
    scored row kept, rewritten parts named by their ids, emptied parts gone."""
    out = _out(tmp_path)
    part(out, [("a", "missing: twice in one part"), ("a", None), ("h", None)])
    before = pq.read_table(out)
    state, _, stats = _plan(out, _input("a", "b", "c"), 2, retry_errors=True)
    drop = choose_duplicates(state, stats["dup_records"])
    for image_id, k in stats["retry_records"]:
        drop.setdefault(k, set()).add(image_id)
    dropped = drop_rows(state, drop)
    after = pq.read_table(out)
    assert dropped == 5 and after.num_rows == before.num_rows - dropped == 5
    ids = _ids(after)
    assert sorted(ids) == sorted(set(ids)) == ["a", "b", "d", "e", "h"]  # c goes: it is about to be tagged again
    rows = {r["image_id"]: r for r in after.to_pylist()}
    assert all(r["error"] is None for r in rows.values()), rows  # scored rows won
    # each rewritten part is named by the digest of its ids, as the tag job names it
    for f in out_files(out).files:
        t = pq.read_table(f)
        assert write_part(str(tmp_path / "again"), t).rsplit("/", 1)[1] == os.path.basename(f)
    assert out_files(out).total == len(ids)
    # a part left with no row is deleted, not rewritten empty
    state = out_files(out)
    victims = set(_ids(pq.read_table(state.files[0])))
    assert drop_rows(state, {0: victims}) == len(victims)
    assert not os.path.exists(state.files[0]) and out_files(out).files == state.files[1:]

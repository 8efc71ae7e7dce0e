"""The tagging-output contract: one output row per input row (error rows null), parts
named by their ids, OUT described from footers alone, and embeddings of another
backbone refused."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tag_outs import VOCAB, part

from mlray.io import storage
from mlray.io.manifest import LABELS_KEY
from mlray.io.tagged import (EMBEDDING_KEY, check_backbone, embedding_parts, out_files, rows_of, score_rows,
                             score_schema, write_part)
from mlray.model.thresholds import ThresholdPolicy


def test_rows_of_puts_each_matrix_row_where_ok_and_null_elsewhere():
    m = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    col = rows_of(m, np.array([True, False, True]), pa.float32())
    assert col.type == pa.list_(pa.float32()) and col.to_pylist() == [[1, 2, 3], None, [4, 5, 6]]
    assert rows_of(np.zeros((0, 3), np.float32), np.array([False, False]), pa.float32()).to_pylist() == [None, None]


def test_every_input_row_gives_one_output_row_and_error_rows_have_no_scores():
    ids = pa.array(["a", "b", "c", "d"])
    errors = pa.array([None, "truncated: cut short", None, None], pa.string())
    ok = np.array([True, False, True, True])
    scores = np.array([[0.9, 0.2, 0.6], [0.1, 0.1, 0.1], [0.3, 0.8, 0.7]], np.float64)
    policy = ThresholdPolicy("global", [0.5, 0.5, 0.65], 0.5, at_least_one=True)
    cols = score_rows(ids, None, errors, scores, ok, policy, pa.array(VOCAB), "run@epoch3")
    t = pa.table(cols, schema=score_schema(VOCAB))  # the contract's schema, as written
    rows = t.to_pylist()
    assert [r["image_id"] for r in rows] == ["a", "b", "c", "d"]
    assert rows[1]["scores"] is None and rows[1]["labels"] is None and rows[1]["error"] == "truncated: cut short"
    assert rows[0]["labels"] == ["cat"]  # 0.6 is under bird's 0.65
    assert rows[2]["labels"] == ["cat"]  # nothing passes: at_least_one gives the top label
    assert rows[3]["labels"] == ["dog", "bird"]  # in vocabulary order
    assert np.allclose(rows[3]["scores"], [0.3, 0.8, 0.7]) and t.schema.field("scores").type == pa.list_(pa.float32())
    assert {r["model"] for r in rows} == {"run@epoch3"} and all(r["uri"] is None for r in rows)
    assert json.loads(t.schema.metadata[LABELS_KEY]) == VOCAB
    # every row an error: all null, still one row each
    none = score_rows(ids, ids, pa.array(["x: y"] * 4), np.zeros((0, 3)), np.zeros(4, bool), policy,
                      pa.array(VOCAB), "m")
    assert none["scores"].to_pylist() == [None] * 4 and none["labels"].to_pylist() == [None] * 4
    assert none["uri"] is ids


def test_a_part_is_named_by_its_ids_and_a_retried_write_replaces_it(tmp_path):
    out = str(tmp_path / "out")
    first = part(out, [("b", None), ("a", None), ("c", "missing: gone")])
    digest = hashlib.sha1("a\nb\nc".encode()).hexdigest()[:24]
    assert os.path.basename(first) == f"part-{digest}.parquet"
    table = pq.read_table(first)
    again = write_part(out, table.take(pa.array([2, 0, 1])))  # the same rows, another order
    assert again == first and storage.list_files(out) == [first]
    other = write_part(out, table.slice(0, 2))
    assert other != first and len(storage.list_files(out)) == 2
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]  # nothing half-written left beside them
    assert pq.ParquetFile(first).metadata.row_group(0).column(0).compression == "ZSTD"


def test_out_is_described_from_the_footers(tmp_path):
    out = str(tmp_path / "out")
    assert out_files(out).files == [] and out_files(out).total == 0  # not there yet: empty
    a = part(out, [("a", None), ("b", None)], model="r@epoch1")
    b = part(out, [("c", "decode: bad")], model="r@epoch2")
    other = part(out, [("d", None)], vocab=["x", "y"], model="r@epoch2")
    state = out_files(out)
    assert state.files == sorted([a, b, other]) and state.total == 4
    assert dict(zip(state.files, state.rows)) == {a: 2, b: 1, other: 1}
    assert state.models == {"r@epoch1", "r@epoch2"}
    assert state.vocabs == {json.dumps(VOCAB): min(a, b), json.dumps(["x", "y"]): other}  # a part to name in errors
    assert state.embeddings == {False} and state.embedding_infos == {}
    with pytest.raises(storage.StorageError, match="is a file; OUT is a directory"):
        out_files(a)


def test_embeddings_of_another_backbone_are_refused(tmp_path):
    info = {"model": "r@epoch1", "dim": 4, "backbone_digest": "d1"}
    good = str(tmp_path / "good")
    part(good, [("a", None), ("b", "decode: bad")], embedding=info)
    part(good, [("c", None)], embedding=info)
    state, found = embedding_parts(good)
    assert found == info and state.total == 3 and state.embeddings == {True}
    assert json.loads(pq.read_schema(state.files[0]).metadata[EMBEDDING_KEY]) == info
    check_backbone(found, "d1", 4, good, "runs/r")  # the same backbone: accepted
    with pytest.raises(ValueError) as e:
        check_backbone(found, "d2", 4, good, "runs/other")
    assert "d1" in str(e.value) and "d2" in str(e.value) and "runs/other" in str(e.value)
    with pytest.raises(ValueError, match="dim 4"):
        check_backbone(found, "d1", 8, good, "runs/r")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no Parquet parts"):
        embedding_parts(str(tmp_path / "empty"))
    plain = str(tmp_path / "plain")
    part(plain, [("a", None)], embedding=info)
    part(plain, [("b", None)])
    with pytest.raises(ValueError, match="parts without an embedding column; tag the images with --embeddings"):
        embedding_parts(plain)
    mixed = str(tmp_path / "mixed")
    part(mixed, [("a", None)], embedding=info)
    part(mixed, [("b", None)], embedding={**info, "backbone_digest": "d9"})
    with pytest.raises(ValueError, match="more than one backbone"):
        embedding_parts(mixed)

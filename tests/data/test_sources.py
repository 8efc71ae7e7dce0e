"""Label sources read from real files (one-hot CSV, label lists in CSV and Parquet,
COCO JSON): the rows, labels, vocabulary and splits they hold, and errors that name
the file, row and column at fault."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlray.data.sources import SourceError, load_source, parse_label_list


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _error(path, **kw) -> str:
    """The error of reading ``path``; it names the file at fault (the source or its names file)."""
    with pytest.raises(SourceError) as e:
        load_source(path, **kw)
    msg = str(e.value)
    assert msg.startswith(path) or msg.startswith(kw.get("label_names") or path), msg
    return msg


def test_one_hot_csv_with_a_split_column(tmp_path):
    path = _write(tmp_path, "l.csv", "\ufefffilename,cat,dog,split\na.jpg,1,0,train\n\nb.jpg,1,1,\nc.jpg,0,0,test\n")
    src = load_source(path)
    assert src.filenames == ["a.jpg", "b.jpg", "c.jpg"] and len(src) == 3
    assert src.vocab == ["cat", "dog"] and src.labels == [["cat"], ["cat", "dog"], []]
    assert src.splits == ["train", None, "test"]  # an empty cell: the split is chosen later
    assert src.rows == [2, 3, 4]  # rows as a spreadsheet numbers them (blank lines skipped)
    assert load_source(_write(tmp_path, "n.csv", "image,a\nx.jpg,True\n")).splits is None


def test_one_hot_index_header_takes_names_from_a_file(tmp_path):
    path = _write(tmp_path, "idx.csv", "filename,0,1,2\na.jpg,1,0,1\nb.jpg,0,1,0\n")
    names = _write(tmp_path, "names.txt", "person\n\ndog\ncar\n")
    src = load_source(path, label_names=names)
    assert src.vocab == ["person", "dog", "car"] and src.labels == [["person", "car"], ["dog"]]
    as_csv = _write(tmp_path, "names.csv", "Id,Labels\n0,person\n1,dog\n2,car\n")
    assert load_source(path, label_names=as_csv).vocab == ["person", "dog", "car"]
    short = _write(tmp_path, "short.txt", "person\ndog\n")
    assert "3 label columns but the label names file has 2 names" in _error(path, label_names=short)
    twice = _write(tmp_path, "twice.txt", "a\nb\na\n")
    assert "'a' appears twice (positions 1 and 3)" in _error(path, label_names=twice)


def test_bad_one_hot_cells_name_the_row_and_column(tmp_path):
    msg = _error(_write(tmp_path, "v.csv", "filename,cat,dog\na.jpg,1,0\nb.jpg,0,yes\n"))
    assert "row 3, column 'dog'" in msg and "'yes' is not 0 or 1" in msg
    msg = _error(_write(tmp_path, "w.csv", "filename,cat,dog\na.jpg,1\n"))
    assert "row 2 has 2 cells, the header has 3" in msg
    msg = _error(_write(tmp_path, "e.csv", "filename,cat\n,1\n"))
    assert "row 2: the filename cell is empty" in msg
    msg = _error(_write(tmp_path, "h.csv", "filename\na.jpg\n"))
    assert "no label columns" in msg
    assert "no such file" in _error(str(tmp_path / "absent.csv"))


def test_label_list_cells_in_every_spelling(tmp_path):
    path = _write(tmp_path, "lists.csv",
                  'filename,tags\na.jpg,"[cat, dog]"\nb.jpg,cat|bird\nc.jpg,"[\'dog\', \'dog\']"\nd.jpg,\n'
                  'e.jpg,"bird; cat"\n')
    src = load_source(path)
    assert src.labels == [["cat", "dog"], ["cat", "bird"], ["dog"], [], ["bird", "cat"]]
    assert src.vocab == ["bird", "cat", "dog"] and src.rows == [2, 3, 4, 5, 6]
    assert parse_label_list('["a", "b"]', "f", 2) == ["a", "b"]  # JSON
    assert parse_label_list("[a,b]", "f", 2) == ["a", "b"]  # neither JSON nor Python: split on commas
    assert parse_label_list(["x", "y", "x"], "f", 2) == ["x", "y"]  # a real list, duplicates once
    assert parse_label_list(None, "f", 2) == []
    with pytest.raises(SourceError, match="f: row 7: cannot read label list"):
        parse_label_list("['a'], ['b']", "f", 7)  # a tuple of lists, not a list


def test_label_lists_with_a_names_file_and_named_columns(tmp_path):
    path = _write(tmp_path, "cols.csv", "pic,what,split\na.jpg,cat|dog,val\nb.jpg,dog,\n")
    src = load_source(path, filename_column="pic", labels_column="what")
    assert src.filenames == ["a.jpg", "b.jpg"] and src.labels == [["cat", "dog"], ["dog"]]
    assert src.splits == ["val", None]
    names = _write(tmp_path, "names.txt", "dog\ncat\nfish\n")
    assert load_source(path, filename_column="pic", labels_column="what", label_names=names).vocab == \
        ["dog", "cat", "fish"]  # the names file's order, unused labels kept
    few = _write(tmp_path, "few.txt", "dog\n")
    msg = _error(path, filename_column="pic", labels_column="what", label_names=few)
    assert "labels not in the label names file: ['cat']" in msg
    msg = _error(path, filename_column="picture", labels_column="what")
    assert "no column named 'picture' for the filename" in msg
    msg = _error(_write(tmp_path, "nofile.csv", "thing,labels\na.jpg,cat\n"))
    assert "no filename column" in msg and "--filename-column" in msg


def test_label_lists_in_parquet(tmp_path):
    path = str(tmp_path / "lists.parquet")
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg", "c.jpg"], "labels": [["b", "a"], [], None],
                             "split": ["train", None, "test"]}), path)
    src = load_source(path)
    assert src.filenames == ["a.jpg", "b.jpg", "c.jpg"] and src.labels == [["b", "a"], [], []]
    assert src.vocab == ["a", "b"] and src.splits == ["train", None, "test"] and src.rows == [0, 1, 2]
    nolist = str(tmp_path / "nolist.parquet")
    pq.write_table(pa.table({"path": ["a.jpg"], "stuff": [["x"]]}), nolist)
    assert "no label-list column" in _error(nolist) and "--labels-column" in _error(nolist)
    empty = str(tmp_path / "empty.parquet")
    pq.write_table(pa.table({"path": pa.array([], pa.string()), "labels": pa.array([], pa.list_(pa.string()))}), empty)
    assert "has no rows" in _error(empty)


def _coco(**over):
    doc = {
        "images": [{"id": 7, "file_name": "x/a.jpg"}, {"id": 3, "file_name": "x/b.jpg"}, {"id": 5, "file_name": "c.jpg"}],
        "categories": [{"id": 2, "name": "bicycle"}, {"id": 1, "name": "person"}, {"id": 9, "name": "car"}],
        "annotations": [
            {"image_id": 7, "category_id": 9}, {"image_id": 7, "category_id": 1}, {"image_id": 7, "category_id": 1},
            {"image_id": 3, "category_id": 2},
        ],
    }
    return json.dumps({**doc, **over})


def test_coco_instances_become_label_sets(tmp_path):
    src = load_source(_write(tmp_path, "coco.json", _coco()))
    assert src.vocab == ["person", "bicycle", "car"]  # category id order
    assert src.filenames == ["x/a.jpg", "x/b.jpg", "c.jpg"]  # the file's image order
    assert src.labels == [["person", "car"], ["bicycle"], []]  # one label per category, unannotated kept
    assert src.splits is None


def test_broken_coco_files_say_what_is_wrong(tmp_path):
    def msg(text, name="c.json"):
        return _error(_write(tmp_path, name, text))

    assert "not valid JSON" in msg("{oops")
    assert "not a COCO instances file" in msg(json.dumps([1, 2]))
    assert "images[1]: duplicate image id 7" in msg(_coco(images=[{"id": 7, "file_name": "a"}, {"id": 7, "file_name": "b"}]))
    assert "annotations[0]: image_id 4 is not in 'images'" in msg(_coco(annotations=[{"image_id": 4, "category_id": 1}]))
    assert "annotations[0]: category_id 8 is not in 'categories'" in msg(
        _coco(annotations=[{"image_id": 7, "category_id": 8}]))
    assert "categories[0] needs 'id' and 'name'" in msg(_coco(categories=[{"id": 1}]))
    assert "COCO file has no images" in msg(_coco(images=[], annotations=[]))
    assert "label 'a' appears twice" in msg(_coco(categories=[{"id": 1, "name": "a"}, {"id": 2, "name": "a"}]))

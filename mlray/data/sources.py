"""Importers: the label files people actually have, turned into manifest rows.

Three shapes are understood, detected from the file:

* one-hot CSV: a filename column, then one 0/1 column per label (header = names,
  or indices with a separate label-names file);
* label lists: a CSV or Parquet file with a filename column and a column of label
  lists (``"[cat, dog]"``, ``cat|dog``, ``cat,dog`` or a real Parquet list);
* COCO instances JSON: an image is positive for every category it has at least
  one annotation of; images with no annotations are kept with no labels.

Every error names the file and, where it applies, the row (1-based, counting the
header as row 1, as a spreadsheet shows it) and the column.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mlray.io import storage

FILENAME_COLUMNS = ("filename", "file_name", "file", "image", "image_id", "path", "id", "name", "img")
LABEL_LIST_COLUMNS = ("labels", "label", "tags", "categories", "classes")
SPLIT_COLUMN = "split"
_LIST_SEPARATORS = re.compile(r"[|;,]")


class SourceError(ValueError):
    """The label source is malformed; the message says where and what to do."""


@dataclass
class Source:
    """Rows read from a label source, before images are checked or split."""

    filenames: list[str]
    labels: list[list[str]]
    vocab: list[str]
    splits: list[str | None] | None = None
    rows: list[int] = field(default_factory=list)  # the source row of each entry, for messages
    path: str = ""

    def __len__(self) -> int:
        return len(self.filenames)


def read_label_names(uri: str) -> list[str]:
    """Label names from a text file (one per line) or a CSV with a ``Labels`` column."""
    text = storage.read_text(uri)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise SourceError(f"{uri}: label names file is empty")
    header = next(csv.reader([lines[0]]))
    lower = [h.strip().lower() for h in header]
    if "labels" in lower and (len(header) > 1 or lower == ["labels"]):
        col = lower.index("labels")
        names = [row[col].strip() for row in csv.reader(lines[1:]) if len(row) > col]
    else:
        names = lines
    _check_names(names, uri, "label names file")
    return names


def _check_names(names: Sequence[str], path: str, what: str) -> None:
    for i, n in enumerate(names):
        if not n.strip():
            raise SourceError(f"{path}: {what}: label {i + 1} has an empty name; every label needs a name")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise SourceError(
                f"{path}: {what}: label {n!r} appears twice (positions {seen[n] + 1} and {i + 1}); names must be unique"
            )
        seen[n] = i


def _pick_column(header: Sequence[str], wanted: str | None, candidates: Sequence[str], path: str, what: str) -> int:
    lower = [h.strip().lower() for h in header]
    if wanted:
        if wanted not in header:
            raise SourceError(f"{path}: no column named {wanted!r} for the {what} (columns: {list(header)})")
        return list(header).index(wanted)
    for c in candidates:
        if c in lower:
            return lower.index(c)
    return -1


def parse_label_list(value, path: str, row: int) -> list[str]:
    """Parse one cell of a label-list column into label names."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = value
    else:
        text = str(value).strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                try:
                    items = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    items = text.strip("[]").split(",")
            if not isinstance(items, list):
                raise SourceError(f"{path}: row {row}: cannot read label list {text!r}")
        else:
            items = _LIST_SEPARATORS.split(text)
    out = []
    for it in items:
        name = str(it).strip().strip("'\"").strip()
        if name and name not in out:
            out.append(name)
    return out


def _read_csv(uri: str) -> list[list[str]]:
    text = storage.read_text(uri)
    if text.startswith("\ufeff"):
        text = text[1:]
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        raise SourceError(f"{uri}: the file is empty (no header, no rows)")
    if len(rows) == 1:
        raise SourceError(f"{uri}: the file has a header but no rows")
    return rows


def _one_hot_value(cell: str, path: str, row: int, column: str) -> bool:
    c = cell.strip()
    if c in ("1", "1.0", "True", "true"):
        return True
    if c in ("0", "0.0", "False", "false", ""):
        return False
    raise SourceError(
        f"{path}: row {row}, column {column!r}: value {cell!r} is not 0 or 1; "
        "one-hot label columns hold only 0/1 (use a label-list column for names)"
    )


def from_one_hot_rows(
    rows: list[list[str]], path: str, *, filename_column: str | None, label_names: list[str] | None
) -> Source:
    header = [h.strip() for h in rows[0]]
    fcol = _pick_column(header, filename_column, FILENAME_COLUMNS, path, "filename")
    if fcol < 0:
        fcol = 0
    scol = _pick_column(header, None, (SPLIT_COLUMN,), path, "split")
    label_cols = [i for i in range(len(header)) if i not in (fcol, scol)]
    if not label_cols:
        raise SourceError(f"{path}: no label columns after the filename column {header[fcol]!r}")
    names = [header[i] for i in label_cols]
    if label_names is not None:
        if len(label_names) != len(label_cols):
            raise SourceError(
                f"{path}: {len(label_cols)} label columns but the label names file has {len(label_names)} names"
            )
        names = list(label_names)  # positional: the header may hold only indices
    else:
        for k, n in zip(label_cols, names):
            if not n:
                raise SourceError(
                    f"{path}: header column {k + 1} (after {header[k - 1]!r}) has an empty name; "
                    "name every label column, or pass --label-names FILE"
                )
    _check_names(names, path, "header")
    src = Source([], [], names, [] if scol >= 0 else None, [], path)
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise SourceError(f"{path}: row {r} has {len(row)} cells, the header has {len(header)}")
        fname = row[fcol].strip()
        if not fname:
            raise SourceError(f"{path}: row {r}: the filename cell is empty")
        src.filenames.append(fname)
        src.labels.append(
            [names[j] for j, k in enumerate(label_cols) if _one_hot_value(row[k], path, r, header[k] or str(k + 1))]
        )
        if scol >= 0:
            src.splits.append(row[scol].strip() or None)
        src.rows.append(r)
    return src


def from_label_list_records(
    records: list[dict], columns: list[str], path: str, *, filename_column: str | None,
    labels_column: str | None, label_names: list[str] | None, first_row: int,
) -> Source:
    fcol = _pick_column(columns, filename_column, FILENAME_COLUMNS, path, "filename")
    if fcol < 0:
        raise SourceError(
            f"{path}: no filename column (looked for {FILENAME_COLUMNS}); pass --filename-column NAME"
        )
    lcol = _pick_column(columns, labels_column, LABEL_LIST_COLUMNS, path, "label list")
    fname_key, labels_key = columns[fcol], columns[lcol]
    scol = _pick_column(columns, None, (SPLIT_COLUMN,), path, "split")
    split_key = columns[scol] if scol >= 0 else None
    src = Source([], [], [], [] if split_key else None, [], path)
    seen: set[str] = set()
    for r, rec in enumerate(records, start=first_row):
        fname = rec.get(fname_key)
        if fname is None or not str(fname).strip():
            raise SourceError(f"{path}: row {r}: the filename cell ({fname_key!r}) is empty")
        labels = parse_label_list(rec.get(labels_key), path, r)
        src.filenames.append(str(fname).strip())
        src.labels.append(labels)
        seen.update(labels)
        if split_key:
            s = rec.get(split_key)
            src.splits.append(str(s).strip() if s not in (None, "") else None)
        src.rows.append(r)
    if label_names is not None:
        unknown = sorted(seen - set(label_names))
        if unknown:
            raise SourceError(f"{path}: labels not in the label names file: {unknown[:10]}")
        src.vocab = list(label_names)
    else:
        src.vocab = sorted(seen)
    return src


def from_coco(uri: str) -> Source:
    try:
        doc = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise SourceError(f"{uri}: not valid JSON ({e}); expected a COCO instances file") from e
    if not isinstance(doc, dict) or "images" not in doc or "categories" not in doc:
        keys = list(doc)[:10] if isinstance(doc, dict) else type(doc).__name__
        raise SourceError(
            f"{uri}: not a COCO instances file: needs top-level 'images', 'categories' and "
            f"'annotations' (found {keys})"
        )
    for key in ("images", "categories", "annotations"):
        if not isinstance(doc.get(key, []), list):
            raise SourceError(f"{uri}: COCO key {key!r} must be a list")
    cats: dict[int, str] = {}
    for i, c in enumerate(doc["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise SourceError(f"{uri}: categories[{i}] needs 'id' and 'name'")
        cats[c["id"]] = str(c["name"])
    vocab = [cats[k] for k in sorted(cats)]
    _check_names(vocab, uri, "COCO categories")
    images: dict[int, str] = {}
    order: list[int] = []
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise SourceError(f"{uri}: images[{i}] needs 'id' and 'file_name'")
        if im["id"] in images:
            raise SourceError(f"{uri}: images[{i}]: duplicate image id {im['id']}")
        images[im["id"]] = str(im["file_name"])
        order.append(im["id"])
    positives: dict[int, set[int]] = {k: set() for k in images}
    for i, a in enumerate(doc.get("annotations", [])):
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
            raise SourceError(f"{uri}: annotations[{i}] needs 'image_id' and 'category_id'")
        if a["image_id"] not in images:
            raise SourceError(f"{uri}: annotations[{i}]: image_id {a['image_id']} is not in 'images'")
        if a["category_id"] not in cats:
            raise SourceError(f"{uri}: annotations[{i}]: category_id {a['category_id']} is not in 'categories'")
        positives[a["image_id"]].add(a["category_id"])
    if not order:
        raise SourceError(f"{uri}: COCO file has no images")
    return Source(
        filenames=[images[k] for k in order],
        labels=[[cats[c] for c in sorted(positives[k])] for k in order],
        vocab=vocab,
        rows=[i for i in range(len(order))],
        path=uri,
    )


def load_source(
    uri: str,
    *,
    filename_column: str | None = None,
    labels_column: str | None = None,
    label_names: str | None = None,
) -> Source:
    """Read any supported label source; the format is detected from the file."""
    if not storage.exists(uri):
        raise SourceError(f"{uri}: no such file")
    names = read_label_names(label_names) if label_names else None
    lower = uri.lower()
    if lower.endswith(".json"):
        return from_coco(uri)
    if lower.endswith(".parquet"):
        fs, path = storage.resolve(uri)
        table: pa.Table = pq.read_table(path, filesystem=fs)
        if table.num_rows == 0:
            raise SourceError(f"{uri}: the file has no rows")
        return from_label_list_records(
            table.to_pylist(), table.column_names, uri, filename_column=filename_column,
            labels_column=labels_column or _default_list_column(table.column_names, uri),
            label_names=names, first_row=0,
        )
    rows = _read_csv(uri)
    header = [h.strip() for h in rows[0]]
    list_col = labels_column or next((h for h in header if h.lower() in LABEL_LIST_COLUMNS), None)
    if list_col:
        records = [dict(zip(header, r)) for r in rows[1:]]
        return from_label_list_records(
            records, header, uri, filename_column=filename_column, labels_column=list_col,
            label_names=names, first_row=2,
        )
    return from_one_hot_rows(rows, uri, filename_column=filename_column, label_names=names)


def _default_list_column(columns: list[str], uri: str) -> str:
    for c in columns:
        if c.lower() in LABEL_LIST_COLUMNS:
            return c
    raise SourceError(f"{uri}: no label-list column (looked for {LABEL_LIST_COLUMNS}); pass --labels-column NAME")

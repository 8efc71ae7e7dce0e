"""The fixes format: label changes an audit suggests, a person reviews, and ``prepare`` applies.

    mlray audit --manifest M --model RUN --out DIR          # writes DIR/fixes.csv (``write_fixes``)
    # a reviewer sets keep to 1 or 0 on each row
    mlray prepare --fixes DIR/fixes.csv --manifest M --out M2  # ``apply_fixes``

One row per (image, label) pair, most suspicious first:

    keep       1: apply the change; 0 (or empty): leave the label as it is. The audit
               writes 1 on the rows it flags, 0 on the ones below its cut.
    image_id   the manifest's id
    label      a label of the manifest's vocabulary
    observed   the label now: 1 present, 0 absent
    suggested  the label after the change: 1 - observed
    kind       missing (labelled 0, the model says present) | wrong (labelled 1, the model says absent)
    score      the out-of-fold probability of the label
    suspicion  how likely the label as it stands is an error (the ranking key)
    split, uri where the row is, for the reviewer

M2 has M's rows, ids, splits, content hashes and packed bytes, in M's order; only
the kept labels change. What changed is recorded in M2's schema metadata
(``mlray.fixes``: source, fixes file and its digest, counts) and in its
``_stats.json`` (the same, per-label counts and every change).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from mlray.io import storage
from mlray.io.manifest import (
    ManifestError, ManifestWriter, absolute_uris, first_schema, manifest_base, manifest_files, read_manifest,
    read_row_order,
)

FIXES_KEY = b"mlray.fixes"  # schema metadata of a manifest written by ``apply_fixes``: what changed, as JSON
FIXES_COLUMNS = ("keep", "image_id", "label", "observed", "suggested", "kind", "score", "suspicion", "split", "uri")
REQUIRED = ("keep", "image_id", "label", "observed", "suggested")
KINDS = {0: "missing", 1: "wrong"}  # by observed value
_TRUE = {"1", "true", "yes", "y", "x"}
_FALSE = {"0", "false", "no", "n", ""}


class FixesError(ValueError):
    """The fixes file cannot be applied; the message names its line and column."""


def write_fixes(uri: str, rows: pa.Table) -> str:
    """Write ``rows`` (``FIXES_COLUMNS``; ``keep``, ``observed``, ``suggested`` 0/1)
    as the fixes CSV at ``uri``, atomically."""
    missing = [c for c in FIXES_COLUMNS if c not in rows.column_names]
    if missing:
        raise ValueError(f"fixes rows lack columns {missing}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FIXES_COLUMNS)
    cols = [rows.column(c).to_pylist() for c in FIXES_COLUMNS]
    for r in zip(*cols):
        w.writerow([_cell(v) for v in r])
    storage.write_text(uri, buf.getvalue())
    return uri


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


@dataclass
class Fix:
    line: int  # line of the CSV (the header is line 1)
    image_id: str
    label: str
    observed: int
    suggested: int


def read_fixes(uri: str) -> tuple[list[Fix], int]:
    """The kept rows of a fixes CSV and the number of rows not kept. Refuses, naming
    the line: a missing column, a keep, observed or suggested value that is not 0/1,
    a suggestion equal to the observed label, an (image, label) pair listed twice."""
    try:
        text = storage.read_text(uri)
    except storage.StorageError as e:
        raise FixesError(f"--fixes {uri}: {e}") from e
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise FixesError(f"--fixes {uri}: empty file; expected a header with {', '.join(REQUIRED)}")
    header = [h.strip() for h in header]
    lacking = [c for c in REQUIRED if c not in header]
    if lacking:
        raise FixesError(f"--fixes {uri}: no column {', '.join(lacking)} (has {', '.join(header)}); "
                         "use the fixes.csv that `mlray audit` writes")
    at = {c: header.index(c) for c in REQUIRED}
    kept: list[Fix] = []
    not_kept = 0
    seen: dict[tuple[str, str], int] = {}
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise FixesError(f"--fixes {uri}: line {line}: {len(row)} cells, the header has {len(header)}")
        keep = row[at["keep"]].strip().lower()
        if keep not in _TRUE | _FALSE:
            raise FixesError(f"--fixes {uri}: line {line}: keep {row[at['keep']]!r}: write 1 to apply the change, "
                             "0 to leave the label as it is")
        image_id, label = row[at["image_id"]], row[at["label"]].strip()
        if not image_id or not label:
            raise FixesError(f"--fixes {uri}: line {line}: empty image_id or label")
        key = (image_id, label)
        if key in seen:
            raise FixesError(f"--fixes {uri}: line {line}: image {image_id!r} label {label!r} is also on line "
                             f"{seen[key]}; list each pair once")
        seen[key] = line
        values = {}
        for c in ("observed", "suggested"):
            v = row[at[c]].strip()
            if v not in ("0", "1"):
                raise FixesError(f"--fixes {uri}: line {line}: {c} {v!r}: must be 0 or 1")
            values[c] = int(v)
        if values["observed"] == values["suggested"]:
            raise FixesError(f"--fixes {uri}: line {line}: suggested equals observed ({values['observed']}): "
                             "nothing to change")
        if keep in _TRUE:
            kept.append(Fix(line, image_id, label, values["observed"], values["suggested"]))
        else:
            not_kept += 1
    return kept, not_kept


@dataclass
class FixesResult:
    files: list[str]
    rows: int  # rows of the new manifest (= rows of the source)
    applied: int
    added: int
    removed: int
    not_kept: int
    per_label: dict[str, dict[str, int]] = field(default_factory=dict)

    def format(self) -> str:
        return (f"applied {self.applied} fixes ({self.added} labels added, {self.removed} removed); "
                f"{self.not_kept} rows not kept; {self.rows} rows written")


def _check_against(fixes: Sequence[Fix], table: pa.Table, vocab: Sequence[str], fixes_uri: str,
                   manifest: str) -> dict[str, list[tuple[str, int]]]:
    """Every kept fix names an id and a label of the manifest, and its ``observed``
    is the manifest's label now. Returns id -> [(label, new value)]."""
    index = {v: i for i, v in enumerate(vocab)}
    ids = table.column("image_id").combine_chunks()
    wanted = pa.array(sorted({f.image_id for f in fixes}), pa.string())
    where = pc.index_in(wanted, value_set=ids).to_pylist()
    row_of = dict(zip(wanted.to_pylist(), where))
    labels = table.column("labels")
    by_id: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for f in fixes:
        if f.label not in index:
            raise FixesError(f"--fixes {fixes_uri}: line {f.line}: label {f.label!r} is not in {manifest}'s "
                             f"vocabulary ({len(vocab)} labels)")
        r = row_of[f.image_id]
        if r is None:
            raise FixesError(f"--fixes {fixes_uri}: line {f.line}: image {f.image_id!r} is not in {manifest}")
        has = int(f.label in labels[r].as_py())
        if has != f.observed:
            raise FixesError(
                f"--fixes {fixes_uri}: line {f.line}: image {f.image_id!r} label {f.label!r} is observed={f.observed} "
                f"in the fixes but {has} in {manifest}; the fixes were made from another version of the manifest: "
                "audit this one again"
            )
        by_id[f.image_id].append((f.label, f.suggested))
    return by_id


def _apply(table: pa.Table, by_id: dict[str, list[tuple[str, int]]], vocab: Sequence[str]) -> pa.Table:
    ids = table.column("image_id").to_pylist()
    hit = [i for i, x in enumerate(ids) if x in by_id]
    if not hit:
        return table
    order = {v: i for i, v in enumerate(vocab)}
    labels = table.column("labels").to_pylist()
    for i in hit:
        now = set(labels[i])
        for label, value in by_id[ids[i]]:
            (now.add if value else now.discard)(label)
        labels[i] = sorted(now, key=order.__getitem__)
    j = table.column_names.index("labels")
    return table.set_column(j, table.schema.field(j), pa.array(labels, table.schema.field(j).type))


def _place(uri: str) -> str:
    return uri.rstrip("/") if "://" in uri else os.path.abspath(uri)


def apply_fixes(manifest: str, fixes_uri: str, out: str) -> FixesResult:
    """Write ``manifest`` to ``out`` with the kept fixes of ``fixes_uri`` applied;
    nothing else changes (ids, splits, order, packed bytes). Everything is checked
    before the first part is written."""
    from mlray.data.stats import manifest_stats

    if _place(out) == _place(manifest):
        raise FixesError(f"--out {out} is --manifest itself; write the fixed manifest to a new place")
    fixes, not_kept = read_fixes(fixes_uri)
    table, vocab = read_manifest(manifest)
    by_id = _check_against(fixes, table, vocab, fixes_uri, manifest)
    added = sum(f.suggested for f in fixes)
    per_label: dict[str, Counter] = defaultdict(Counter)
    for f in fixes:
        per_label[f.label]["added" if f.suggested else "removed"] += 1
    previous = (first_schema(manifest).metadata or {}).get(FIXES_KEY)
    record = {
        "source": manifest, "fixes": fixes_uri, "fixes_sha256": hashlib.sha256(storage.read_bytes(fixes_uri)).hexdigest(),
        "applied": len(fixes), "added": added, "removed": len(fixes) - added, "not_kept": not_kept,
    }
    if previous:
        record["previous"] = json.loads(previous)
    writer = ManifestWriter(out, vocab, row_order=read_row_order(manifest), metadata={FIXES_KEY: json.dumps(record).encode()})
    base = manifest_base(manifest)
    rows = 0
    try:
        for f in manifest_files(manifest):
            part = absolute_uris(storage.read_table(f).replace_schema_metadata(None), base)
            writer.write(_apply(part, by_id, vocab))
            rows += part.num_rows
        if rows != table.num_rows:
            raise ManifestError(f"{manifest}: read {table.num_rows} rows, then {rows} while writing {out}; "
                                "the manifest changed meanwhile: run the command again")
        stats = manifest_stats(_apply(table, by_id, vocab), vocab)
        stats["source"] = manifest
        stats["fixes"] = {**record, "per_label": {k: dict(v) for k, v in sorted(per_label.items())},
                          "changes": [{"image_id": f.image_id, "label": f.label, "from": f.observed, "to": f.suggested}
                                      for f in fixes]}
        files = writer.close(stats)
    except BaseException:
        writer.abort()
        raise
    return FixesResult(files, rows, len(fixes), added, len(fixes) - added, not_kept,
                       {k: dict(v) for k, v in sorted(per_label.items())})


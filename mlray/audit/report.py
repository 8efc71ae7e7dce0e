"""``DIR/report.html`` of an audit: one self-contained page (thumbnails inlined, no
JavaScript) where a person reviews a label in a minute.

For each label, most flagged first: its most suspicious images as thumbnails,
in two rows (labelled 0 but the model sees it: *missing?*; labelled 1 but the
model does not: *wrong?*), each with the label as it is and as suggested, the
out-of-fold score and the suspicion. Above them, a table of every label's
estimated error rates. Thumbnails are read only for the images shown: by URI,
or from the row groups of a packed manifest that hold them.
"""

from __future__ import annotations

import html
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlray.audit.suspicion import MISSING, WRONG
from mlray.evaluation.report import _fmt, data_uri, page
from mlray.io import storage
from mlray.io.manifest import is_packed, manifest_files

THUMB = 112  # pixels: the thumbnail's side
MAX_SECTIONS = 60  # labels shown with thumbnails (most flagged first); every label is in the table
STYLE = """.cards{display:flex;flex-wrap:wrap;gap:6px;margin:4px 0 12px}.card{width:128px;font-size:11px;
border:1px solid #ccc;padding:3px}.card img{width:112px;height:112px;display:block;margin:auto}
.flag{border:2px solid #c33}.id{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
h3{margin:18px 0 2px}.kind{font-size:12px;color:#555;margin:4px 0 0}"""


def _image_bytes(manifest: str, rows: list[dict]) -> dict[str, bytes | None]:
    """image_id -> encoded bytes of the rows shown (None when unreadable)."""
    if not rows:
        return {}
    out: dict[str, bytes | None] = {}
    if is_packed(manifest):
        wanted = pa.array(sorted({r["image_id"] for r in rows}), pa.string())
        for f in manifest_files(manifest):
            fs, path = storage.resolve(f)
            with fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                ids = pf.read(columns=["image_id"]).column("image_id")
                hit = pc.is_in(ids, value_set=wanted).to_numpy(zero_copy_only=False)
                if not hit.any():
                    continue
                starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
                for g in range(pf.num_row_groups):
                    if hit[starts[g]:starts[g + 1]].any():
                        t = pf.read_row_group(g, columns=["image_id", "image"])
                        t = t.filter(pc.is_in(t.column("image_id"), value_set=wanted))
                        out.update(zip(t.column("image_id").to_pylist(), t.column("image").to_pylist()))
    todo = [r for r in {r["image_id"]: r for r in rows}.values() if out.get(r["image_id"]) is None and r["uri"]]
    for r, data in zip(todo, storage.fetch_many([r["uri"] for r in todo], 16)):
        out[r["image_id"]] = None if isinstance(data, Exception) else data
    return out


def _thumbnail(data: bytes | None) -> str | None:
    """A JPEG data URI of the image squashed to ``THUMB`` pixels, as the model sees it."""
    from PIL import Image

    from mlray.data.images import ImageError, decode

    if data is None:
        return None
    try:
        pixels = decode(data, THUMB)
    except ImageError:
        return None
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
    return data_uri(buf.getvalue(), "image/jpeg")


def _card(r: dict, thumb: str | None) -> str:
    img = f'<img alt="" src="{thumb}">' if thumb else '<div style="height:112px">(unreadable)</div>'
    return (f'<div class="card{" flag" if r["flagged"] else ""}">{img}<div class=id title="{html.escape(r["image_id"])}">'
            f'{html.escape(r["image_id"])}</div>{html.escape(r["label"])}: {r["observed"]} &rarr; '
            f'<b>{1 - r["observed"]}</b><br>score {r["score"]:.3f} &middot; suspicion {r["suspicion"]:.2f}'
            f'{" &middot; " + html.escape(r["split"]) if r.get("split") else ""}</div>')


def render(manifest: str, result, per_label: list[dict], top: dict, opts, thumbs: dict[str, str | None]) -> str:
    title = f"mlray audit: {manifest}"
    flagged = result.flagged
    intro = (
        f"<h1>{html.escape(title)}</h1><p>{result.audited} of {result.rows} images audited with {opts.folds}-fold "
        f"out-of-fold heads; {result.labels_audited} labels judged. Estimated {result.rho:.1%} of positive labels "
        f"forgotten and {result.phi:.1%} put on the wrong image. <b>{flagged.get(MISSING, 0)}</b> missing and "
        f"<b>{flagged.get(WRONG, 0)}</b> wrong labels flagged (suspicion &ge; {opts.cut}; red frame). "
        f"Suspicion is the estimated probability that the label as it stands is an error, so it reads "
        f"the same on every label.</p><p>To apply: set <code>keep</code> in <code>fixes.csv</code> (1 applies, 0 "
        f"leaves the label), then <code>mlray prepare --fixes {html.escape(storage.join(result.out, 'fixes.csv'))} "
        f"--manifest {html.escape(manifest)} --out NEW_MANIFEST</code>.</p>"
    )
    if result.unreadable:
        intro += f"<p class=warn>{len(result.unreadable)} images could not be read and were left out (audit.json).</p>"

    def rate(r):
        return (r["est_missing"] + r["est_wrong"]) / max(r["positives"], 1)

    ordered = sorted(per_label, key=lambda r: (-r["audited"], -rate(r), r["label"]))
    head = ("<h2>Per label</h2><table><tr><th>label</th><th>positives</th><th>negatives</th>"
            "<th>est. forgotten</th><th>est. wrong</th><th>est. error rate (of positives)</th>"
            "<th>flagged missing</th><th>flagged wrong</th><th>listed</th></tr>")
    rows = "".join(
        f"<tr><td>{html.escape(r['label'])}</td><td>{r['positives']}</td><td>{r['negatives']}</td>"
        + (f"<td>{r['est_missing']:.1f}</td><td>{r['est_wrong']:.1f}</td><td>{rate(r):.1%}</td>"
           f"<td>{r['missing_flagged']}</td><td>{r['wrong_flagged']}</td><td>{r['missing'] + r['wrong']}</td>"
           if r["audited"] else "<td colspan=6>not audited: too few positives or negatives</td>")
        + "</tr>"
        for r in ordered
    )
    shown = _shown(top)
    sections = []
    for label in shown[:MAX_SECTIONS]:
        parts = [f"<h3>{html.escape(label)}</h3>"]
        for kind, text in ((MISSING, "missing? labelled 0, the model sees it"),
                           (WRONG, "wrong? labelled 1, the model does not see it")):
            cards = top.get((label, kind), [])
            if cards:
                parts.append(f"<div class=kind>{text}</div><div class=cards>"
                             + "".join(_card(r, thumbs.get(r["image_id"])) for r in cards) + "</div>")
        sections.append("".join(parts))
    more = (f"<p>{len(shown) - MAX_SECTIONS} more labels have suspects: see suspects.parquet.</p>"
            if len(shown) > MAX_SECTIONS else "")
    folds = "".join(f"<tr><td>{f['fold']}</td><td>{f['train_rows']}</td><td>{f['stop_rows']}</td>"
                    f"<td>{f['best_epoch']}</td><td>{_fmt(float(f['val_mAP']))}</td></tr>" for f in result.folds)
    fold_table = ("<h2>Folds</h2><table><tr><th>fold</th><th>images fitted</th><th>held out to stop</th>"
                  f"<th>best pass</th><th>held-out mAP</th></tr>{folds}</table>")
    body = (intro + "<h2>Most suspicious, per label</h2>" + ("".join(sections) or "<p>No suspects.</p>") + more
            + head + rows + "</table>" + fold_table)
    return page(title, body, STYLE)


def _shown(top: dict) -> list[str]:
    """Labels with suspects, most flagged first."""
    return sorted({label for label, _ in top},
                  key=lambda v: (-sum(r["flagged"] for k in (MISSING, WRONG) for r in top.get((v, k), [])), v))


def write_report(uri: str, manifest: str, result, per_label: list[dict], top: dict, opts) -> str:
    """Render the page (thumbnails of the suspects shown only) and write it to ``uri``."""
    rows = [r for label in _shown(top)[:MAX_SECTIONS] for k in (MISSING, WRONG) for r in top.get((label, k), [])]
    data = _image_bytes(manifest, rows)
    thumbs = {i: _thumbnail(d) for i, d in data.items()}
    storage.write_text(uri, render(manifest, result, per_label, top, opts, thumbs))
    return uri

"""New labels without reading the corpus: ``mlray head`` on stored embeddings and
``mlray tag --from-embeddings``, on a real trained run, real images and Parquet."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlray.model import rundir
from mlray.training.head import HeadOptions, train_head
from mlray.data.images import decode
from mlray.model.predictor import Predictor
from mlray.io.manifest import read_manifest
from mlray.tagging.job import TagError, TagOptions, tag

pytestmark = pytest.mark.slow  # every test here starts Ray or uses a trained run


def _perturbed_copy(run: str, dest: str) -> str:
    """The run with one backbone weight nudged: another backbone, same head shape."""
    shutil.copytree(run, dest)
    for name in (rundir.WEIGHTS, rundir.EMA_FILE):
        path = os.path.join(dest, name)
        if os.path.exists(path):
            w = rundir.load_weights(path)
            key = next(k for k in w if "conv_stem" in k)
            w[key] = w[key] + 0.01
            rundir.save_weights(path, w)
    return dest


def test_head_from_embeddings_is_a_normal_run_and_rescoring_is_exactly_once(trained_run, local_ray, tmp_path):
    run, manifest, _ = trained_run
    emb_out = str(tmp_path / "emb")
    first = tag(run, manifest, emb_out, TagOptions(embeddings=True, rows_per_file=100))
    n = first.rows_in
    # two parts gone: their labelled ids must be embedded from their images
    parts = sorted(f for f in os.listdir(emb_out) if f.endswith(".parquet"))
    gone_ids = set(pq.read_table([os.path.join(emb_out, p) for p in parts[:2]]).column("image_id").to_pylist())
    aside = tmp_path / "aside"
    aside.mkdir()
    for p in parts[:2]:
        shutil.move(os.path.join(emb_out, p), aside / p)
    labelled, _ = read_manifest(manifest)
    fit_ids = {i for i, s in zip(labelled.column("image_id").to_pylist(), labelled.column("split").to_pylist())
               if s in ("train", "val")}  # the test split is not needed to fit a head
    gone = len(gone_ids & fit_ids)

    new_run = str(tmp_path / "runs" / "digits-head")
    res = train_head(run, emb_out, manifest, new_run, HeadOptions(epochs=60, patience=15))
    assert res.computed == gone and res.from_embeddings == len(fit_ids) - gone and not res.unreadable
    assert res.val["mAP"] > res.val["prior.mAP"] + 0.1  # it learned, from embeddings alone
    head_doc = json.load(open(os.path.join(new_run, "head.json")))
    assert head_doc["computed"] == gone and head_doc["source_run"] == run
    assert "embeddings" in res.format() and str(gone) in res.format()

    # a normal run directory: predict scores images with the source backbone and the new head
    p_new, p_src = Predictor.load(new_run, "cpu"), Predictor.load(run, "cpu")
    assert p_new.backbone_digest == p_src.backbone_digest

    # rescoring from embeddings: no image read, same scores as predict on the run directory
    out = str(tmp_path / "rescored")
    half = str(tmp_path / "emb-half")  # the source as it was: the ids of the parts set aside are absent
    shutil.copytree(emb_out, half)
    for p in parts[:2]:
        shutil.move(aside / p, os.path.join(emb_out, p))
    s1 = tag(new_run, half, out, TagOptions(from_embeddings=True))
    t = pq.read_table(out)
    assert s1.rows_written == t.num_rows == pq.read_table(half).num_rows
    rows = t.to_pylist()[:24]
    images = np.stack([decode(open(r["uri"], "rb").read(), p_new.size) for r in rows])
    direct = p_new.scores(images)
    assert np.allclose(np.asarray([r["scores"] for r in rows]), direct, atol=5e-3)
    assert all(r["model"] == p_new.art.model_id for r in rows)

    # the source grows (one error row among the new ones): --incremental adds only the new ids
    err = pq.read_table(half).slice(0, 1)
    err = err.set_column(err.schema.get_field_index("image_id"), "image_id", pa.array(["broken.jpg"]))
    err = err.set_column(err.schema.get_field_index("error"), "error", pa.array(["decode: truncated"]))
    err = err.set_column(err.schema.get_field_index("embedding"), err.schema.field("embedding"),
                         pa.nulls(1, err.schema.field("embedding").type))
    pq.write_table(err, os.path.join(emb_out, "part-error.parquet"))
    s2 = tag(new_run, emb_out, out, TagOptions(from_embeddings=True, incremental=True))
    assert s2.rows_written == n + 1 - s1.rows_written and s2.rows_with_errors == 1
    t = pq.read_table(out)
    assert t.num_rows == n + 1 == len(set(t.column("image_id").to_pylist()))
    broken = t.filter(pa.compute.equal(t.column("image_id"), "broken.jpg")).to_pylist()[0]
    assert broken["error"] == "decode: truncated" and broken["scores"] is None
    assert tag(new_run, emb_out, out, TagOptions(from_embeddings=True, incremental=True)).rows_written == 0
    summary = json.load(open(os.path.join(out, "_summary.json")))
    assert summary["complete"] and summary["rows_in_out"] == n + 1

    # another backbone: refused by both, naming both digests
    other = _perturbed_copy(new_run, str(tmp_path / "runs" / "other"))
    other_digest = Predictor.load(other, "cpu").backbone_digest
    assert other_digest != p_src.backbone_digest
    with pytest.raises(TagError) as refused:
        tag(other, emb_out, str(tmp_path / "never"), TagOptions(from_embeddings=True))
    assert other_digest in str(refused.value) and p_src.backbone_digest in str(refused.value)
    assert not os.path.exists(tmp_path / "never" / "_summary.json")
    with pytest.raises(ValueError, match=other_digest):
        train_head(other, emb_out, manifest, str(tmp_path / "runs" / "never"))
    # a tag output without embeddings is refused with what to do
    plain = tmp_path / "plain"
    plain.mkdir()
    part = pq.read_table(os.path.join(emb_out, parts[0]))
    pq.write_table(part.drop_columns(["embedding"]).replace_schema_metadata(None), plain / "part-0.parquet")
    with pytest.raises(TagError, match="--embeddings"):
        tag(new_run, str(plain), str(tmp_path / "never2"), TagOptions(from_embeddings=True))

"""Bulk tagging with real Ray and real S3: error rows, exactly once, incremental, equal scores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from images_zoo import bad_variants, good_variants

from mlray import storage
from mlray.images import decode
from mlray.inference import Predictor
from mlray.manifest import LABELS_KEY
from mlray.tag import TagError, TagOptions, tag


@pytest.fixture(scope="module")
def corpus(trained_run, s3_server):
    """~260 real images on S3: mosaics plus odd formats and broken files."""
    _, _, root = trained_run
    bucket = s3_server.create_bucket("corpus")
    names = sorted(os.listdir(os.path.join(root, "images")))[:240]
    storage.upload_dir(os.path.join(root, "images"), f"{bucket}/all")
    for n in sorted(os.listdir(os.path.join(root, "images")))[240:]:
        storage.delete(f"{bucket}/all/{n}")
    for name, data in good_variants().items():
        storage.write_bytes(f"{bucket}/all/odd/{name}", data)
    for name, (data, _) in bad_variants().items():
        storage.write_bytes(f"{bucket}/all/bad/{name}", data)
    return f"{bucket}/all", names


def _read_out(s3_server, out):
    fs = pafs.S3FileSystem(
        access_key=s3_server.access_key, secret_key=s3_server.secret_key,
        endpoint_override=f"127.0.0.1:{s3_server.port}", scheme="http", region="us-east-1",
    )
    return pq.read_table(out.removeprefix("s3://"), filesystem=fs)


def test_tag_prefix_on_s3_with_bad_and_odd_images(trained_run, corpus, s3_server, local_ray):
    run, _, _ = trained_run
    prefix, names = corpus
    out = prefix.replace("/all", "/tags")
    summary = tag(run, prefix + "/", out, TagOptions(rows_per_file=100))
    n_in = len(names) + len(good_variants()) + len(bad_variants())
    assert summary.rows_in == n_in and summary.rows_in_out == n_in
    assert summary.duplicates == 0 and summary.missing == 0
    assert summary.rows_with_errors == len(bad_variants())
    t = _read_out(s3_server, out)  # plain pyarrow, as another team reads it
    assert t.num_rows == n_in
    assert t.column_names == ["image_id", "uri", "scores", "labels", "model", "error"]
    vocab = __import__("json").loads(t.schema.metadata[LABELS_KEY])
    rows = {r["image_id"]: r for r in t.to_pylist()}
    assert len(rows) == n_in
    for name, (_, reason) in bad_variants().items():
        row = rows[f"bad/{name}"]
        assert row["error"].startswith(reason) and row["scores"] is None and row["labels"] is None
    for name in good_variants():
        assert rows[f"odd/{name}"]["error"] is None
    art = Predictor.load(run).art
    th = np.asarray(art.policy.thresholds)
    for image_id, row in rows.items():
        if row["error"] is not None:
            continue
        s = np.asarray(row["scores"], dtype=np.float32)
        assert len(s) == len(vocab)
        expected = {vocab[j] for j in np.flatnonzero(s >= th)} or {vocab[int(np.argmax(s))]}
        assert set(row["labels"]) == expected, image_id


def test_scores_match_a_plain_pytorch_loop(trained_run, corpus, local_ray, tmp_path):
    run, _, root = trained_run
    prefix, names = corpus
    out = str(tmp_path / "tags")
    tag(run, os.path.join(root, "images"), out, TagOptions(batch_size=16))
    t = pq.read_table(out).to_pandas().set_index("image_id")
    p = Predictor.load(run, "cpu")
    for name in names[:40:8]:
        img = decode(open(os.path.join(root, "images", name), "rb").read(), p.size)
        ref = p.scores(img[None])[0]
        assert np.allclose(np.asarray(t.loc[name, "scores"]), ref, atol=1e-4), name
    # --top-k overrides the run's thresholds: exactly the k best labels
    top = pq.read_table(tag(run, os.path.join(root, "images"), str(tmp_path / "top2"), TagOptions(top_k=2)).out)
    vocab = p.vocab
    for row in top.to_pylist()[:50]:
        best = {vocab[j] for j in np.argsort(-np.asarray(row["scores"]))[:2]}
        assert set(row["labels"]) == best


def _tag_cli(run, inp, out, *extra):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mlray", "tag", "--model", run, "--input", inp, "--out", out, *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True,
    )


def test_killed_job_reruns_to_exactly_once_and_incremental_adds_only_new(trained_run, corpus, s3_server):
    run, _, root = trained_run
    prefix, names = corpus
    inp = prefix.replace("/all", "/kill")
    for copy in ("a", "b"):  # 480 images: long enough to be killed halfway
        for n in names:
            storage.write_bytes(f"{inp}/{copy}/{n}", open(os.path.join(root, "images", n), "rb").read())
    n_in = 2 * len(names)
    out = prefix.replace("/all", "/kill-tags")
    proc = _tag_cli(run, inp, out, "--rows-per-file", "10", "--batch-size", "8")
    deadline = time.time() + 240
    while time.time() < deadline:
        if storage.exists(out) and storage.list_files(out, (".parquet",)):
            break
        if proc.poll() is not None:
            pytest.fail("the job finished before it could be killed:\n" + proc.stdout.read())
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    partial = len(_read_out(s3_server, out))
    assert 0 < partial < n_in
    with pytest.raises(TagError, match="--incremental"):
        # a finished OUT is refused without --incremental; a killed one is resumed
        rerun = _tag_cli(run, inp, out)
        assert rerun.wait(timeout=300) == 0, rerun.stdout.read()
        t = _read_out(s3_server, out)
        assert t.num_rows == n_in and len(set(t.column("image_id").to_pylist())) == n_in
        tag(run, inp, out)
    # nightly: new images arrive, only they are tagged
    for n in names[:30]:
        storage.write_bytes(f"{inp}/c/{n}", open(os.path.join(root, "images", n), "rb").read())
    summary = tag(run, inp, out, TagOptions(incremental=True))
    assert summary.rows_skipped == n_in and summary.rows_written == 30
    t = _read_out(s3_server, out)
    assert t.num_rows == n_in + 30 and len(set(t.column("image_id").to_pylist())) == n_in + 30

"""evaluate and predict on a real short training run."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlray.model import rundir
from mlray.cli import main
from mlray.evaluation.report import PLOTS, evaluate

pytestmark = pytest.mark.slow  # every test here starts Ray or uses a trained run


def test_report_renders_with_plots_and_baselines(trained_run, local_ray, tmp_path, capsys):
    run, manifest, _ = trained_run
    out = str(tmp_path / "report")
    assert main(["evaluate", run, "--manifest", manifest, "--split", "test", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "mAP" in printed and "prior" in printed and "report.html" in printed
    doc = json.loads(open(os.path.join(out, "metrics.json")).read())
    m = doc["metrics"]
    assert m["mAP"] > m["prior.mAP"] and not doc["collapse"]["collapsed"]
    assert {"global", "per_label", "top_k", "fixed 0.5"} <= set(doc["threshold_strategies"])
    for name in PLOTS:
        data = open(os.path.join(out, f"{name}.png"), "rb").read()
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.width > 200 and img.height > 150
        assert len(np.unique(np.asarray(img.convert("L")))) > 10  # drawn, not blank
    page = open(os.path.join(out, "report.html")).read()
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    table = pq.read_table(os.path.join(out, "per_label.parquet"))
    assert table.column_names[:4] == ["label", "support", "predicted", "AP"]
    assert table.num_rows == 10 and "threshold" in open(os.path.join(out, "per_label.csv")).readline()


def test_collapsed_model_is_flagged_in_report(trained_run, local_ray, tmp_path):
    run, manifest, _ = trained_run
    dead = str(tmp_path / "dead")
    shutil.copytree(run, dead)
    weights = rundir.load_weights(os.path.join(dead, rundir.WEIGHTS))
    weights["classifier.weight"].zero_()
    weights["classifier.bias"].fill_(-12.0)  # predicts nothing, same score everywhere
    rundir.save_weights(os.path.join(dead, rundir.WEIGHTS), weights)
    # one evaluation (each is a Ray job): the CLI's exit code, and the report it wrote
    assert main(["evaluate", dead, "--manifest", manifest, "--out", str(tmp_path / "r"), "--fail-on-collapse"]) == 1
    doc = json.loads(open(tmp_path / "r" / "metrics.json").read())
    assert doc["collapse"]["collapsed"]
    assert any("label-prior" in r for r in doc["collapse"]["reasons"])
    assert "Model collapse" in open(tmp_path / "r" / "report.html").read()


def test_predict_prints_labels_with_probabilities(trained_run, capsys):
    run, _, root = trained_run
    imgs = sorted(os.listdir(os.path.join(root, "images")))[:2]
    paths = [os.path.join(root, "images", i) for i in imgs]
    bad = os.path.join(root, "broken.jpg")
    open(bad, "wb").write(b"not an image")
    assert main(["predict", run, *paths, bad, "--top", "3"]) == 1
    out = capsys.readouterr().out.splitlines()
    first = next(line for line in out if line.startswith(paths[0]))
    assert all(" 0." in part or " 1." in part for part in first.split(": ", 1)[1].split(", "))
    assert any(line.startswith(bad) and "ERROR not_an_image" in line for line in out)


def test_evaluate_rejects_a_manifest_with_other_labels(trained_run, tmp_path):
    from mlray.io.manifest import build_table, write_manifest

    run, _, root = trained_run
    img = os.path.join(root, "images", sorted(os.listdir(os.path.join(root, "images")))[0])
    write_manifest(build_table(["a"], [img], [["cat"]], splits=["test"]), ["cat"], str(tmp_path / "m"))
    with pytest.raises(ValueError, match="vocabulary"):
        evaluate(run, str(tmp_path / "m"), "test", str(tmp_path / "o"))

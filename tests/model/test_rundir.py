"""The run directory round trip: what training writes (config, labels, best weights,
thresholds, best.json) is what scoring loads, from a real safetensors file."""

from __future__ import annotations

import os

import pytest
import torch

from mlray.config import build_config
from mlray.model import rundir
from mlray.model.thresholds import ThresholdPolicy


def _run(tmp_path, name="digits"):
    cfg = build_config({"data": {"manifest": "m"}, "run": {"name": name, "storage_path": str(tmp_path / "runs")}},
                       ["optim.epochs=4", "loss.name=focal"])
    directory = rundir.run_dir(cfg)
    rundir.write_run_files(directory, cfg, ["cat", "dog", "bird"], [5, 1, 0], 20)
    return cfg, directory


def test_what_training_writes_is_what_scoring_loads(tmp_path):
    cfg, d = _run(tmp_path)
    assert d == str(tmp_path / "runs" / "digits")
    assert rundir.read_best(d) == {}  # before the first epoch ends
    weights = {"classifier.weight": torch.randn(3, 4), "classifier.bias": torch.zeros(3)}
    policy = ThresholdPolicy("per_label", [0.3, 0.5, 0.7], 0.5, support=[4, 1, 0])
    record = {"epoch": 2, "val_mAP": 0.61}
    rundir.write_best(d, weights, policy, 2, {"mAP": 0.61, "f1_micro": 0.5}, record)
    best = rundir.read_best(d)
    assert best == {"epoch": 2, "val": {"mAP": 0.61, "f1_micro": 0.5}, "record": record}
    art = rundir.load_artifacts(d)
    assert art.config == cfg and art.vocab == ["cat", "dog", "bird"]
    assert art.train_positives == [5, 1, 0] and art.n_train == 20 and art.prior == [0.25, 0.05, 0.0]
    assert art.policy == policy and art.best == best and art.model_id == "digits@epoch2"
    loaded = rundir.load_weights(os.path.join(d, rundir.WEIGHTS))
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert rundir.weight_shapes(rundir.scoring_weights(d)) == {"classifier.weight": [3, 4], "classifier.bias": [3]}
    # EMA weights, when a run kept them, are the ones it scores with
    rundir.save_weights(os.path.join(d, rundir.EMA_FILE), weights)
    assert rundir.scoring_weights(d) == os.path.join(d, rundir.EMA_FILE)


def test_a_run_without_thresholds_scores_at_half_and_a_missing_file_is_named(tmp_path):
    _, d = _run(tmp_path, "early")
    rundir.save_weights(os.path.join(d, rundir.WEIGHTS), {"w": torch.ones(2)})
    art = rundir.load_artifacts(d)
    assert art.policy.thresholds == [0.5, 0.5, 0.5] and art.model_id == "early"  # no best.json: no epoch
    os.remove(os.path.join(d, rundir.LABELS))
    with pytest.raises(FileNotFoundError, match=r"early: no labels\.json; pass a run directory"):
        rundir.load_artifacts(d)


def test_a_truncated_weights_file_is_refused_from_its_header(tmp_path):
    path = tmp_path / "w.safetensors"
    rundir.save_weights(str(path), {"a": torch.zeros(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        rundir.weight_shapes(str(path))
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a safetensors weights file"):
        rundir.weight_shapes(str(path))

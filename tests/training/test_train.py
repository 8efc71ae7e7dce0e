"""Ray Train end to end on CPU: real Ray, real S3, real images; failures injected for real."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest

from mlray.model import rundir
from mlray.io import storage
from configs import small_run_config
from mlray.config import build_config

pytestmark = pytest.mark.slow  # Ray Train runs, and checkpoints read from the S3 server



@pytest.fixture(scope="module")
def s3_manifest(s3_server, tmp_path_factory):
    """600 real mosaics, packed, in a manifest on the S3 server."""
    from mlray.demo.datasets import mnist_mosaics
    from mlray.data.prepare import prepare

    root = tmp_path_factory.mktemp("train_images")
    csv_path = mnist_mosaics(str(root), 600, size=64, seed=11)
    bucket = s3_server.create_bucket("train-data")
    prepare(csv_path, str(root), f"{bucket}/manifest", split="train=0.85,val=0.15", pack=True)
    return f"{bucket}/manifest", bucket


def _history(directory):
    return rundir.read_history(directory)


def _wait_for_checkpoint(directory, epoch, timeout=300):
    """Until Ray Train has *registered* the checkpoint of ``epoch`` (its snapshot
    lists it): an uploaded but unregistered checkpoint is not resumed from."""
    snapshot = storage.join(directory, "checkpoint_manager_snapshot.json")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if storage.exists(snapshot):
            results = json.loads(storage.read_text(snapshot)).get("checkpoint_results", [])
            if any(r["metrics"].get("epoch", 0) >= epoch for r in results):
                return
        time.sleep(0.2)
    raise TimeoutError(f"no registered checkpoint for epoch {epoch} in {directory}")


def _train_in_thread(cfg):
    from mlray.training.trainer import train

    box = {}

    def run():
        try:
            box["result"] = train(cfg)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_two_workers_learn_from_s3_checkpoint_there_and_a_killed_worker_resumes(local_ray, s3_manifest):
    """DDP on two workers from a manifest on S3, checkpoints on S3; a worker process
    killed after the first checkpoint restarts the run from it. One run for both:
    each Ray Train start costs ~30 s of the suite."""
    from mlray.training.trainer import train

    manifest, bucket = s3_manifest
    cfg = small_run_config(manifest, f"{bucket}/runs", "ddp2", **{"optim.epochs": 3})
    d = rundir.run_dir(cfg)
    t, box = _train_in_thread(cfg)
    _wait_for_checkpoint(d, 1)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert workers, "training worker processes"
    os.kill(workers[0].pid, signal.SIGKILL)
    t.join(timeout=600)
    assert "error" not in box, box.get("error")
    hist = box["result"].history
    assert [h["epoch"] for h in hist] == [1, 2, 3]  # epoch 1 is not redone: it came from the checkpoint
    assert hist[0]["restarts"] == 0 and hist[-1]["restarts"] >= 1
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["val_mAP"] > hist[-1]["prior_mAP"] + 0.05
    assert not hist[-1]["collapsed"]
    for h in hist:  # the input-wait diagnostics of the epoch line are shares and parts of the epoch
        assert 0 <= h["input_wait"] < 1 and 0 <= h["first_batch_s"] and h["images_per_s"] > 0
    # The first epoch of each life of the workers streams; the next ones replay each worker's rows
    # from memory (both workers agreed), every row of the split again.
    first_of_life = [i == 0 or h["restarts"] != hist[i - 1]["restarts"] for i, h in enumerate(hist)]
    assert [h["input_from_memory"] for h in hist] == [not f for f in first_of_life]
    assert any(h["input_from_memory"] for h in hist)
    assert len({h["train_images"] for h in hist}) == 1 and hist[0]["train_images"] > 0
    assert d.startswith("s3://")
    for name in (rundir.CONFIG, rundir.LABELS, rundir.WEIGHTS, rundir.THRESHOLDS, rundir.BEST, rundir.HISTORY):
        assert storage.exists(storage.join(d, name)), name
    ckpts = [u for u in storage.list_files(d) if "/checkpoint_" in u and u.endswith("train_state.pt")]
    assert ckpts, "Ray checkpoints on S3"
    art = rundir.load_artifacts(d)
    assert art.vocab == [str(i) for i in range(10)] and art.best["epoch"] in (1, 2, 3)
    assert art.config.run.name == "ddp2"
    # a second run with the same name is refused unless resumed
    with pytest.raises(ValueError, match="--resume"):
        train(cfg)


def test_workers_on_one_machine_read_a_checkpoint_in_place(bucket):
    """Resume reads the checkpoint's files from S3 into memory: no download into a
    directory the workers of a machine share (where a late worker's second download
    overwrote the files another was loading)."""
    from concurrent.futures import ThreadPoolExecutor

    import ray.train

    from mlray.training.recipe import STATE_FILE
    from mlray.training.trainer import checkpoint_reader

    weights, state = os.urandom(300_000), os.urandom(50_000)
    base = f"{bucket}/runs/r/checkpoint_2026-12-02_00-00-00.000000"
    storage.write_bytes(storage.join(base, rundir.WEIGHTS), weights)
    storage.write_bytes(storage.join(base, STATE_FILE), state)
    fs, path = storage.resolve(base)
    read = checkpoint_reader(ray.train.Checkpoint(path=path, filesystem=fs))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: (read(rundir.WEIGHTS), read(STATE_FILE)), range(16)))
    assert all(w == weights and s == state for w, s in got)
    assert read(rundir.EMA_FILE) is None  # optional: a run without optim.ema_decay has none
    storage.delete(storage.join(base, STATE_FILE))
    with pytest.raises(storage.StorageError, match=f"checkpoint file {path}/{STATE_FILE}: no such file"):
        read(STATE_FILE)


def test_two_nodes_for_real_and_losing_one_resumes(s3_manifest):
    """Scaling across nodes without a cloud: a head (no CPUs) and two worker nodes,
    separate raylets on this machine, DDP workers on different nodes, S3 as the
    shared storage. One node is removed mid-run and a fresh one added."""
    import ray
    from ray.cluster_utils import Cluster

    manifest, bucket = s3_manifest
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        first = cluster.add_node(num_cpus=2)
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address)
        cfg = small_run_config(manifest, f"{bucket}/runs", "two-nodes", **{
            "scaling.placement_strategy": "STRICT_SPREAD", "scaling.cpus_per_worker": 1,
            "data.decode_cpus": 0.5,
        })
        d = rundir.run_dir(cfg)
        t, box = _train_in_thread(cfg)
        _wait_for_checkpoint(d, 1)
        assert _history(d)[0]["nodes"] == 2
        cluster.remove_node(first)
        cluster.add_node(num_cpus=2)
        t.join(timeout=600)
        assert "error" not in box, box.get("error")
        hist = box["result"].history
        assert [h["epoch"] for h in hist] == [1, 2]
        assert hist[-1]["restarts"] >= 1 and hist[-1]["nodes"] == 2
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_bad_images_are_counted_resume_continues_and_too_many_fail(local_ray, mosaics, tmp_path):
    """Corrupt images in the training split: counted and skipped under the limit,
    the run fails with their ids over it. `--resume` continues a finished run for
    more epochs. Exercises EMA, accumulation and partial unfreezing on the way."""
    import shutil

    from images_zoo import bad_variants

    from mlray.cli import main
    from mlray.data.prepare import prepare
    from mlray.training.trainer import train

    root, csv_path = mosaics
    data = tmp_path / "data"
    shutil.copytree(root, data, ignore=shutil.ignore_patterns("manifest*"))
    lines = open(csv_path).read().splitlines()
    n_labels = len(lines[0].split(",")) - 2
    for name, (blob, _) in list(bad_variants().items())[:3]:
        (data / "images" / f"bad_{name}").write_bytes(blob)
        lines.append(f"images/bad_{name}," + ",".join(["1"] + ["0"] * (n_labels - 1)) + ",train")
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    manifest = str(tmp_path / "manifest")
    prepare(str(data / "labels.csv"), str(data), manifest, split="train=0.8,val=0.2", pack=True)

    cfg = build_config({
        # no memory for the rows: the epochs after the first read them back from local disk
        "data": {"manifest": manifest, "image_size": 64, "batch_size": 16, "max_error_fraction": 0.05,
                 "cache_mb": 0, "cache_dir": str(tmp_path / "spill")},
        "optim": {"epochs": 1, "freeze_epochs": 0, "unfreeze_stages": 2, "accumulate": 2, "ema_decay": 0.9},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "run": {"storage_path": str(tmp_path / "runs"), "name": "bad", "max_failures": 0},
    })
    first = train(cfg)
    assert first.history[0]["decode_errors"] == 3 and first.history[0]["phase"] == "2"
    assert main(["train", "--resume", first.run_dir, "optim.epochs=3"]) == 0
    hist = rundir.read_history(first.run_dir)
    assert [h["epoch"] for h in hist] == [1, 2, 3] and hist[1]["restarts"] == 1
    assert rundir.load_artifacts(first.run_dir).config.optim.epochs == 3
    # the resumed process streams its first epoch and replays the next from local disk, bad rows counted alike
    assert [h["input_from_disk"] for h in hist] == [False, False, True]
    assert not any(h["input_from_memory"] for h in hist)
    assert [h["decode_errors"] for h in hist] == [3, 3, 3]
    # every trained row of the split, whichever source: the epochs differ only by the bad rows
    # that a new order puts into the short last batch, which is not trained on
    trained = [h["train_images"] for h in hist]
    assert max(trained) - min(trained) <= 3 and min(trained) > 0, trained
    assert os.listdir(tmp_path / "spill") == []  # the spill file was never visible, and is gone

    strict = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"max_error_fraction": 0.001}),
        "run": cfg.run.model_copy(update={"name": "strict"}),
    })
    with pytest.raises(Exception, match=r"(?s)[1-3] images could not be decoded.*images/bad_"):
        train(strict)

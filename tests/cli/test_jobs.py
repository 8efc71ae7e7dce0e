"""Cluster configs validate; the job entrypoints run when submitted to a real Ray head."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from servers import BIN, free_port, stop_group, wait_http

from mlray.model import rundir
from mlray.io import storage
from mlray.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(open(os.path.join(ROOT, "cluster.yaml")))
    prepared = prepare_config(config)  # what `ray up` does first, no cloud calls
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert types["gpu_worker"]["min_workers"] == 0
    assert "IamInstanceProfile" in types["gpu_worker"]["node_config"]
    bad = dict(config, available_node_types={**config["available_node_types"], "x": {"bogus": 1}})
    with pytest.raises(Exception):
        validate_config(prepare_config(bad))


def test_job_configs_validate_and_say_how_to_submit():
    paths = sorted(glob.glob(os.path.join(ROOT, "jobs", "configs", "*.yaml")))
    assert {os.path.basename(p) for p in paths} >= {"demo.yaml", "coco80.yaml", "longtail1000.yaml"}
    for p in paths:
        head = open(p).read().split("\ndata:")[0]
        assert "ray job submit --working-dir . -- python jobs/" in head, p
        assert "Runtime env" in head, p
        load_config(p)  # typed, unknown keys rejected


def test_rayjob_manifest_uses_the_same_entrypoint():
    doc = yaml.safe_load(open(os.path.join(ROOT, "rayjob.yaml")))
    assert doc["kind"] == "RayJob" and doc["apiVersion"] == "ray.io/v1"
    script, _, rest = doc["spec"]["entrypoint"].partition(" ")[2].partition(" ")
    assert os.path.exists(os.path.join(ROOT, script))
    cfg = re.search(r"--config (\S+)", doc["spec"]["entrypoint"]).group(1)
    load_config(os.path.join(ROOT, cfg))
    assert doc["spec"]["rayClusterSpec"]["rayVersion"].startswith("2.60")


@pytest.fixture
def ray_head(tmp_path):
    import tempfile

    short = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's unix sockets allow 107-byte paths
    """A real Ray head on loopback in its own session, its own temp dir, stopped
    by signalling its process group (never `ray stop`, which kills every head)."""
    port, dash = free_port(), free_port()
    log = str(tmp_path / "head.log")
    proc = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={short}",
         "--include-dashboard=true", "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, RAY_AUTH_MODE="disabled"),
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_http(address + "/api/version", 90, proc, log)
        yield address
    finally:
        stop_group(proc)
        import shutil

        shutil.rmtree(short, ignore_errors=True)


def _submit(address: str, *entrypoint: str) -> subprocess.CompletedProcess:
    import time

    for _ in range(30):  # the head's job agent comes up a few seconds after the dashboard
        done = subprocess.run(
            [os.path.join(BIN, "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--", *entrypoint],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
            env=dict(os.environ, RAY_AUTH_MODE="disabled"),
        )
        if "No available agent" not in done.stdout + done.stderr:
            return done
        time.sleep(2)
    return done


@pytest.mark.slow
def test_submitted_train_and_tag_jobs_run_on_a_real_head(ray_head, mosaics, s3_server, tmp_path):
    from mlray.data.prepare import prepare

    root, csv_path = mosaics
    manifest = str(tmp_path / "manifest")
    prepare(csv_path, root, manifest, split="train=0.8,val=0.2", pack=True)
    runs = str(tmp_path / "runs")
    train = _submit(
        ray_head, sys.executable, "jobs/train.py", "--config", "jobs/configs/demo.yaml",
        f"data.manifest={manifest}", "data.image_size=64", "optim.epochs=1", "optim.freeze_epochs=0",
        f"run.storage_path={runs}", "run.name=submitted",
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "succeeded" in (train.stdout + train.stderr).lower()
    run = os.path.join(runs, "submitted")
    assert len(rundir.read_history(run)) == 1 and os.path.exists(os.path.join(run, rundir.WEIGHTS))

    out = str(tmp_path / "tags")
    tagged = _submit(ray_head, sys.executable, "jobs/tag.py", "--model", run, "--input", os.path.join(root, "images"),
                     "--out", out)
    assert tagged.returncode == 0, tagged.stdout[-3000:] + tagged.stderr[-3000:]
    summary = json.loads(storage.read_text(os.path.join(out, "_summary.json")))
    assert summary["complete"] and summary["rows_in_out"] == 300 and summary["duplicates"] == 0

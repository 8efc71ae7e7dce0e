"""The GPU check: ``--cpu`` runs every path that needs no CUDA for real and reports
it in the shape of the GPU run; without a usable GPU it says so and fails; its
data and its steady-state clock hold up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks.common import PHOTO_SHAPES, photo_set, steady_from_parts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check(out, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", RAY_AUTH_MODE="disabled")  # no GPU, whatever the machine has
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cpu_mode_runs_every_cpu_path_and_reports_in_the_gpu_runs_shape(tmp_path):
    from benchmarks.gpu_check import STAGES

    proc = _check(tmp_path, "--cpu")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(doc) == {"command", "mode", "passed", "seconds", "jpeg_engine", "ratios", "stages"}
    assert doc["mode"] == "cpu" and doc["passed"] is True
    assert list(doc["stages"]) == [name for name, _, _ in STAGES]
    for name, needs, _ in STAGES:
        stage = doc["stages"][name]
        assert set(stage) == {"status", "seconds", "reason", "result", "details"}, name
        if needs:  # CUDA only: skipped, saying why
            assert stage["status"] == "skipped" and "CUDA" in stage["reason"], (name, stage)
        else:  # every CPU path ran and passed, none skipped
            assert stage["status"] == "pass", (name, stage["reason"])
            assert stage["result"] and stage["seconds"] > 0
    st = {k: v["details"] for k, v in doc["stages"].items()}
    assert st["data"]["photos"] >= 32 and set(st["data"]["sizes"]) == {"640x480", "480x640", "800x600"}
    assert st["decode_cpu"]["pillow_vs_torchvision_cpu"]["mean"] <= 2.0
    assert st["train_fp32"]["weights_finite"] and st["train_fp32"]["largest_weight_change"] > 0
    assert st["scores_cpu"]["fused_vs_as_trained"]["max"] < 1e-3
    for decode in ("device", "cpu"):
        tag = st[f"tag_{decode}"]
        assert tag["summary"]["rows_written"] == tag["images"] and tag["summary"]["rows_with_errors"] == 0
        assert tag["steady"]["parts_timed"] >= 2 and tag["steady"]["img_s"] > 0
    # on a CPU both decode modes decode with Pillow: the same files score the same
    assert st["tag_cpu"]["scores_vs_decode_device"]["max"] < 1e-4
    assert st["model_only"]["img_s"] > 0 and st["train_throughput"]["img_s"] > 0
    assert all(v is not None and v > 0 for v in doc["ratios"].values()), doc["ratios"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | " in md for name, _, _ in STAGES)
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "tags").exists()  # the bulky parts are gone


def test_without_a_usable_gpu_it_says_so_writes_the_report_and_fails(tmp_path):
    proc = _check(tmp_path, timeout=300)
    assert proc.returncode == 1
    assert "no usable CUDA GPU" in proc.stderr and "--cpu runs the CPU paths" in proc.stderr
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    env = doc["stages"]["environment"]
    assert env["status"] == "pass" and env["details"]["cuda_available"] is False and env["details"]["torch"]
    rest = [v for k, v in doc["stages"].items() if k != "environment"]
    assert rest and all(v["status"] == "fail" and "no usable CUDA GPU" in v["reason"] for v in rest)
    assert "**some stage failed**" in (tmp_path / "gpu_check.md").read_text()


def test_steady_state_from_parts_leaves_out_start_up_and_the_flushed_tail():
    start_up = [(20.0, 100)]  # the first part lands after Ray, the model and the first batches
    steady = [(20.0 + i, 100) for i in range(1, 11)]  # then 100 rows a second
    tail = [(30.1, 40)]  # the stream's last rows, flushed at once
    got = steady_from_parts(start_up + steady + tail)
    assert got["img_s"] == pytest.approx(100.0)
    assert got["parts"] == 12 and got["parts_timed"] == 8
    with pytest.raises(ValueError, match="4 or more"):
        steady_from_parts(steady[:3])


def test_photo_set_is_camera_sized_baseline_4_2_0_labelled_and_deterministic(tmp_path):
    a, b = photo_set(str(tmp_path / "a"), 3), photo_set(str(tmp_path / "b"), 3)
    rows_a, rows_b = open(a).read().splitlines(), open(b).read().splitlines()
    assert rows_a == rows_b and rows_a[0] == ",".join(["filename", *PHOTO_SHAPES]) and len(rows_a) == 4
    for row in rows_a[1:]:
        name, *labels = row.split(",")
        assert 1 <= sum(map(int, labels)) <= 3
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes()
        img = Image.open(tmp_path / "a" / name)
        from PIL import JpegImagePlugin

        assert img.width * img.height >= 640 * 480 and not img.info.get("progressive")
        assert JpegImagePlugin.get_sampling(img) == 2  # 4:2:0, as cameras write
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
        assert np.abs(np.diff(pixels, axis=1)).mean() > 2  # texture all over, not flat colour

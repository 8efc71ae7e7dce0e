"""The GPU smoke benchmark runs on GPU machines and says plainly when it cannot."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # a subprocess that imports torch
def test_gpu_smoke_without_a_gpu_skips_in_one_line_and_exits_0():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU visible, whatever the machine has
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == ["gpu_smoke: skipped, no CUDA GPU on this machine"]

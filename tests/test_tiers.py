"""The unit tier (``pytest -m "not slow"``) starts neither Ray nor the S3 server:
a test that asks for a fixture that does, and is not marked slow, stops the
collection and is named."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def test_an_unmarked_test_that_starts_ray_or_the_s3_server_stops_collection(tmp_path):
    for name in ("conftest.py", "servers.py"):
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "test_a.py").write_text(
        "import pytest\n\n"
        "def test_pure():\n    pass\n\n"
        "def test_unmarked(local_ray):\n    pass\n\n"
        "def test_unmarked_bucket(bucket):\n    pass\n\n"
        "@pytest.mark.slow\ndef test_marked(trained_run):\n    pass\n"
    )

    refused = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "-W", "ignore::pytest.PytestUnknownMarkWarning", "-m", "not slow", str(tmp_path)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
    said = refused.stdout + refused.stderr
    assert refused.returncode == 4 and "must be marked @pytest.mark.slow" in said, said  # a usage error: nothing runs
    named = said[said.index("must be marked"):]
    assert "test_a.py::test_unmarked uses local_ray" in named and "test_a.py::test_unmarked_bucket uses s3_server" in named
    assert "test_marked" not in named and "test_pure" not in named

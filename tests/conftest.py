"""Shared fixtures: a real S3 server, real images, a real local Ray."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

from servers import S3Server  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(str(tmp_path_factory.mktemp("s3")))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_server):
    """A fresh bucket URI per test."""
    return s3_server.create_bucket(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def mosaics(tmp_path_factory):
    """300 real multi-label JPEGs (2x2 MNIST mosaics) and their one-hot CSV."""
    from mlray.datasets import mnist_mosaics

    root = tmp_path_factory.mktemp("mosaics")
    csv_path = mnist_mosaics(str(root), 300, size=64, seed=1)
    return str(root), csv_path


@pytest.fixture
def local_ray(s3_server):
    """One embedded local Ray (started the way the jobs start it, with the S3
    settings in place) for the tests that need it, started once and reused; a test
    that builds its own cluster shuts it down, and the next user starts it again."""
    import ray

    from mlray.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray

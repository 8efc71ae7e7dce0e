"""Shared fixtures: a real S3 server, real images, a real local Ray.

Two tiers: ``pytest -m "not slow"`` runs the unit tier, which starts neither Ray
nor the S3 server; every test that starts Ray, trains, runs a job in a subprocess
or needs the S3 server is marked ``slow``. ``make test`` runs both."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

from servers import S3Server  # noqa: E402

# Fixtures that start Ray (directly or through a training run) or the S3 server
# (``bucket`` too, through it): only slow tests may use them.
SLOW_FIXTURES = ("local_ray", "trained_run", "ray_head", "s3_server")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Keep the unit tier free of Ray and of the S3 server: a test that asks for a
    fixture that starts one, and is not marked slow, stops the collection with its name."""
    unmarked = [
        f"  {item.nodeid} uses {', '.join(f for f in SLOW_FIXTURES if f in item.fixturenames)}"
        for item in items
        if item.get_closest_marker("slow") is None and any(f in item.fixturenames for f in SLOW_FIXTURES)
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that start Ray or the S3 server must be marked @pytest.mark.slow (the unit tier, "
            "-m 'not slow', starts neither):\n" + "\n".join(unmarked)
        )


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
    from mlray.demo.datasets import mnist_mosaics

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

    init_ray(num_cpus=2, training=True)
    yield ray


@pytest.fixture(scope="session")
def trained_run(s3_server, tmp_path_factory):
    """One short real training run on local disk, shared by the evaluate, predict
    and tag tests: (run directory, manifest, image root)."""
    from mlray.config import build_config
    from mlray.demo.datasets import mnist_mosaics
    from mlray.data.prepare import prepare
    from mlray.runtime import init_ray
    from mlray.training.trainer import train

    root = tmp_path_factory.mktemp("run_images")
    csv_path = mnist_mosaics(str(root), 500, size=64, seed=21)
    manifest = str(root / "manifest")
    prepare(csv_path, str(root), manifest, split="train=0.8,val=0.2")
    init_ray(num_cpus=2, training=True)
    cfg = build_config({
        "data": {"manifest": manifest, "image_size": 64, "batch_size": 32, "decode_batch_size": 64},
        "optim": {"epochs": 2, "lr": 2e-3, "freeze_epochs": 1, "warmup_epochs": 0.2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "run": {"storage_path": str(root / "runs"), "name": "shared"},
    })
    result = train(cfg)
    return result.run_dir, manifest, str(root)

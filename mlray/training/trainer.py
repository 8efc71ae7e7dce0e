"""``mlray train``: Ray Data streams a manifest into Ray Train DDP fine-tuning.

    mlray train --config jobs/configs/demo.yaml optim.epochs=3 scaling.num_workers=2

The driver checks the run, the weights, the manifest (a sample of its images)
and that the workers can be placed (``mlray.resources``), writes the run directory's config
and labels, builds the two Ray Data streams (train shuffled every epoch, val in
order) and starts a ``TorchTrainer``. Each worker runs ``train_loop_per_worker``:
Ray wiring only (rank, device, dataset shards, checkpoints); the training itself
is ``mlray.training.recipe.Recipe``. A worker that died is restarted by Ray Train
from the last checkpoint (``run.max_failures``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.compute as pc
import torch

from mlray.config import Config
from mlray.resources import Demand
from mlray.data.pipeline import torch_collate
from mlray.io import storage
from mlray.io.manifest import read_manifest
from mlray.model import rundir
from mlray.training.recipe import Dist, Recipe, _say
OPTIONAL_CHECKPOINT_FILES = (rundir.EMA_FILE,)


def checkpoint_reader(checkpoint) -> Callable[[str], bytes | None]:
    """``read(name)``: a file of a Ray Train checkpoint, read into memory straight from
    where the checkpoint is stored (transient errors retried); ``None`` for an optional
    file the checkpoint does not have.

    Not ``Checkpoint.as_directory()``: it downloads into one temporary directory that
    all workers on a machine share, and a worker that gets there after another's
    download has finished downloads again over the files the other is reading (seen
    as "safetensors ... header too small" on resume with two workers on a machine)."""
    import pyarrow.fs as pafs

    fs, base = checkpoint.filesystem, checkpoint.path.rstrip("/")

    def read(name: str) -> bytes | None:
        path = f"{base}/{name}"
        what = f"checkpoint file {path}"
        if name in OPTIONAL_CHECKPOINT_FILES:
            info = storage.retrying(lambda: fs.get_file_info(path), what)
            if info.type == pafs.FileType.NotFound:
                return None
        return storage.read_from(fs, path, what)

    return read


@dataclass
class DatasetInfo:
    vocab: list[str]
    n_train: int
    n_val: int
    train_positives: list[int]


def dataset_info(cfg: Config) -> DatasetInfo:
    """Counts the driver needs before training: rows per split and label
    frequencies; and a sample of the rows' images exists (``check_uris``)."""
    from mlray.io.manifest import check_uris, multi_hot

    table, vocab = read_manifest(cfg.data.manifest)
    if "split" not in table.column_names:
        raise ValueError(f"{cfg.data.manifest}: no 'split' column; run `mlray prepare` with --split")
    split = table.column("split")
    train = table.filter(pc.equal(split, cfg.data.train_split))
    n_val = int(pc.sum(pc.equal(split, cfg.data.val_split)).as_py() or 0)
    if train.num_rows == 0:
        raise ValueError(f"{cfg.data.manifest}: no rows with split={cfg.data.train_split!r} (data.train_split)")
    if n_val == 0:
        raise ValueError(f"{cfg.data.manifest}: no rows with split={cfg.data.val_split!r} (data.val_split)")
    check_uris(cfg.data.manifest, table, splits=[cfg.data.train_split, cfg.data.val_split], flag="data.manifest")
    positives = multi_hot(train.column("labels"), vocab).sum(axis=0)
    return DatasetInfo(vocab, train.num_rows, n_val, [int(p) for p in positives])


# ---------------------------------------------------------------------------- driver


@dataclass
class TrainResult:
    run_dir: str
    best: dict
    history: list[dict] = field(default_factory=list)


class _IngestConfig:
    """Train is split equally (DDP steps in lockstep); validation is split
    unequally so no row is dropped (validation runs without collectives)."""

    def __new__(cls):
        from ray.train import DataConfig

        class IngestConfig(DataConfig):
            def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
                out = [{} for _ in range(world_size)]
                for name, ds in datasets.items():
                    ds = ds.copy(ds)
                    ds.context.execution_options = self._resolve_execution_options(name)
                    for i, it in enumerate(ds.streaming_split(world_size, equal=(name == "train"), locality_hints=worker_node_ids)):
                        out[i][name] = it
                return out

        return IngestConfig()


def has_checkpoint(directory: str) -> bool:
    if not storage.exists(directory):
        return False
    fs, path = storage.resolve(directory)
    import pyarrow.fs as pafs

    return any(
        i.type == pafs.FileType.Directory and os.path.basename(i.path).startswith("checkpoint_")
        for i in fs.get_file_info(pafs.FileSelector(path))
    )


def resolve_paths(cfg: Config) -> Config:
    """Local paths made absolute on the driver: workers run in other directories."""
    from mlray.model.factory import PRETRAINED_WORDS

    def absolute(uri: str) -> str:
        return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))

    weights = cfg.model.pretrained
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"manifest": absolute(cfg.data.manifest)}),
        "run": cfg.run.model_copy(update={"storage_path": absolute(cfg.run.storage_path)}),
        "model": cfg.model.model_copy(update={"pretrained": weights if weights in PRETRAINED_WORDS else absolute(weights)}),
    })


def training_demand(cfg: Config) -> Demand:
    """What the Ray Train workers ask for, and the keys that set it; beside them,
    one decode task's CPUs, without which the input stream never starts (Ray Data
    waits for a free CPU for ever). The train controller and its helpers take no CPU."""
    s = cfg.scaling
    return Demand(
        what="training workers", count=s.num_workers,
        per={"CPU": s.cpus_per_worker, "GPU": s.gpus_per_worker if s.use_gpu else 0.0},
        count_key=f"scaling.num_workers={s.num_workers}",
        keys={"CPU": f"scaling.cpus_per_worker={s.cpus_per_worker:g}",
              **({"GPU": f"scaling.gpus_per_worker={s.gpus_per_worker:g} (scaling.use_gpu=true)"} if s.use_gpu else {})},
        strategy=s.placement_strategy, wait_key="scaling.resource_wait",
        extra={"CPU": cfg.data.decode_cpus}, extra_key=f"data.decode_cpus={cfg.data.decode_cpus:g}",
    )


def startup_retries(resource_wait: float | None) -> int:
    """Ray Train's limit on worker-group start-up failures (``controller_failure_limit``;
    its default, -1, retries for ever): each attempt waits
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) for the placement group, so
    the run gives up after about ``scaling.resource_wait``; -1 with null."""
    if resource_wait is None:
        return -1
    attempt = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    return max(1, int(-(-resource_wait // attempt)))


def train(cfg: Config, *, resume: bool = False) -> TrainResult:
    """Run (or resume) training; returns the run directory and its best epoch."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mlray.data.pipeline import image_dataset
    from mlray.model.factory import resolve_weights
    from mlray.resources import ensure_resources
    from mlray.runtime import init_ray, run_interruptible, worker_runtime_env
    from mlray.data.shuffle import local_buffer_rows

    cfg = resolve_paths(cfg)
    directory = rundir.run_dir(cfg)
    if has_checkpoint(directory) and not resume:
        raise ValueError(
            f"run {directory} already has checkpoints: pass --resume to continue it, or choose a new run.name"
        )
    if resume and not has_checkpoint(directory):
        raise ValueError(f"--resume: {directory} has no checkpoint to resume from")
    resolve_weights(cfg.model, check_hub=True)
    info = dataset_info(cfg)
    per_step = cfg.data.batch_size * cfg.scaling.num_workers
    if info.n_train < per_step:
        raise ValueError(
            f"{info.n_train} training images are fewer than one step (data.batch_size {cfg.data.batch_size} x "
            f"scaling.num_workers {cfg.scaling.num_workers}); lower them"
        )
    init_ray(training=True)
    ensure_resources(training_demand(cfg), cfg.scaling.resource_wait, gpu_flag="scaling.use_gpu=true")
    rundir.write_run_files(directory, cfg, info.vocab, info.train_positives, info.n_train)
    from mlray.model.device_decode import resolve_mode

    common = dict(
        size=cfg.data.image_size, vocab=info.vocab, decode_batch_size=cfg.data.decode_batch_size,
        fetch_concurrency=cfg.data.fetch_concurrency, decode_num_cpus=cfg.data.decode_cpus,
        decode=resolve_mode(cfg.data.decode, 1 if cfg.scaling.use_gpu else 0, "train"),
    )
    datasets = {
        "train": image_dataset(cfg.data.manifest, cfg.data.train_split, shuffle=True, seed=cfg.optim.seed, **common),
        "val": image_dataset(cfg.data.manifest, cfg.data.val_split, shuffle=False, **common),
    }
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    fs, path = storage.resolve(cfg.run.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"), "vocab": info.vocab, "positives": info.train_positives,
            "n_train": info.n_train, "n_val": info.n_val, "run_dir": directory,
            "shuffle_buffer_rows": local_buffer_rows(cfg.data.manifest, cfg.data.image_size, cfg.data.shuffle_buffer_mb),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.run.max_failures, controller_failure_limit=startup_retries(cfg.scaling.resource_wait)
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_mAP", checkpoint_score_order="max"
            ),
            # mlray prints its own line per epoch; Ray's per-report INFO lines repeat it.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env=worker_runtime_env(),
        ),
        datasets=datasets,
        dataset_config=_IngestConfig(),
    )
    try:
        run_interruptible(trainer.fit)
    except ray.train.ControllerError as e:
        cause = e.controller_failure
        name = type(cause).__name__
        if name in ("WorkerGroupStartupTimeoutError", "InsufficientClusterResourcesError"):
            from mlray.resources import ResourceError

            why = ("Ray Train's start-up attempts ran out" if name == "WorkerGroupStartupTimeoutError"
                   else " ".join(str(cause).split()))
            raise ResourceError(f"the training workers ({training_demand(cfg).text()}) did not start within "
                                f"about scaling.resource_wait={cfg.scaling.resource_wait} s: {why}") from None
        raise
    return TrainResult(directory, rundir.read_best(directory), rundir.read_history(directory))


def train_loop_per_worker(loop_cfg: dict) -> None:
    """Runs inside each Ray Train worker: the recipe, fed by this worker's shards."""
    import ray
    import ray.train
    import ray.train.torch

    from mlray.runtime import quiet_train_reports

    quiet_train_reports()  # one line per epoch is ours; no echo of each report
    cfg = Config.model_validate(loop_cfg["config"])
    ctx = ray.train.get_context()
    rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    dist = Dist(world, device)
    nodes = len(set(dist.gather(ray.get_runtime_context().get_node_id())))
    recipe = Recipe(cfg, loop_cfg["vocab"], loop_cfg["positives"], loop_cfg["n_train"], device=device,
                    dist=dist, rank=rank)
    checkpoint = ray.train.get_checkpoint()
    recipe.setup(checkpoint_reader(checkpoint) if checkpoint else None)
    if checkpoint and rank == 0:
        _say(f"resumed from checkpoint at epoch {recipe.state.epoch} (step {recipe.state.step})")
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    bs = cfg.data.batch_size

    def train_batches():
        return train_shard.iter_torch_batches(
            collate_fn=torch_collate(), batch_size=bs, drop_last=False, prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=loop_cfg["shuffle_buffer_rows"],
        )

    def val_batches():
        return val_shard.iter_torch_batches(batch_size=bs, prefetch_batches=2, collate_fn=torch_collate())

    def report(metrics: dict, directory: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)

    recipe.train(train_batches, val_batches, run_dir=loop_cfg["run_dir"], report=report, workers_on_node=local,
                 record_extra={"nodes": nodes})
    recipe.cleanup()

"""``mlray train``: Ray Data streams a manifest into Ray Train DDP fine-tuning.

    mlray train --config jobs/configs/demo.yaml optim.epochs=3 scaling.num_workers=2

Recipe (torchtune-style): ``setup`` builds the model, loss and optimiser from the
config; ``train_epoch`` runs the steps; ``validate`` gathers scores from every
worker and computes the metric set; ``save_checkpoint`` writes the Ray
checkpoint (resume) and, on a new best val mAP, the run directory's model.

Workers get the same number of steps: Ray's equal split gives them the same
number of rows, but not always the same number of batches (ray-project/ray
#66085), so before each step the workers agree (an all-reduce of one flag) that
all of them still have a batch. A worker that died is restarted by Ray Train
from the last checkpoint (``run.max_failures``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc
import torch

from mlray import rundir, storage
from mlray.config import Config
from mlray.data import torch_collate
from mlray.manifest import read_manifest

STATE_FILE = "train_state.pt"


@dataclass
class DatasetInfo:
    vocab: list[str]
    n_train: int
    n_val: int
    train_positives: list[int]


def dataset_info(cfg: Config) -> DatasetInfo:
    """Counts the driver needs before training: rows per split and label frequencies."""
    from mlray.manifest import multi_hot

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


def _has_checkpoint(directory: str) -> bool:
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
    def absolute(uri: str) -> str:
        return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))

    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"manifest": absolute(cfg.data.manifest)}),
        "run": cfg.run.model_copy(update={"storage_path": absolute(cfg.run.storage_path)}),
    })


def train(cfg: Config, *, resume: bool = False) -> TrainResult:
    """Run (or resume) training; returns the run directory and its best epoch."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mlray.data import image_dataset
    from mlray.runtime import init_ray, worker_runtime_env
    from mlray.shuffle import local_buffer_rows

    cfg = resolve_paths(cfg)
    directory = rundir.run_dir(cfg)
    if _has_checkpoint(directory) and not resume:
        raise ValueError(
            f"run {directory} already has checkpoints: pass --resume to continue it, or choose a new run.name"
        )
    if resume and not _has_checkpoint(directory):
        raise ValueError(f"--resume: {directory} has no checkpoint to resume from")
    info = dataset_info(cfg)
    per_step = cfg.data.batch_size * cfg.scaling.num_workers
    if info.n_train < per_step:
        raise ValueError(
            f"{info.n_train} training images are fewer than one step (data.batch_size {cfg.data.batch_size} x "
            f"scaling.num_workers {cfg.scaling.num_workers}); lower them"
        )
    init_ray()
    rundir.write_run_files(directory, cfg, info.vocab, info.train_positives, info.n_train)
    common = dict(
        size=cfg.data.image_size, vocab=info.vocab, decode_batch_size=cfg.data.decode_batch_size,
        fetch_concurrency=cfg.data.fetch_concurrency, decode_num_cpus=cfg.data.decode_cpus,
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
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
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
    trainer.fit()
    best_uri = storage.join(directory, rundir.BEST)
    import json

    best = json.loads(storage.read_text(best_uri)) if storage.exists(best_uri) else {}
    return TrainResult(directory, best, rundir.read_history(directory))


# ---------------------------------------------------------------------------- worker


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimiser step ``step`` of ``total``."""
    total = max(total, 1)
    if schedule == "onecycle":
        up = max(1, int(0.3 * total))
        if step < up:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * step / up)) / 2
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - up) / max(1, total - up))))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@dataclass
class _State:
    epoch: int = 0
    step: int = 0
    best_map: float = -1.0
    bad_epochs: int = 0
    restarts: int = 0
    history: list = field(default_factory=list)


class _Dist:
    """The few collectives the loop needs; no-ops on one worker."""

    def __init__(self, world: int, device: torch.device):
        self.world, self.device = world, device

    def all_have(self, has: bool) -> bool:
        if self.world == 1:
            return has
        t = torch.tensor([1 if has else 0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def _error_rows(batch: dict) -> list[tuple[str, str]]:
    """(image id, reason) of the rows of a batch that could not be decoded."""
    return [(i, e) for i, e in zip(batch["image_id"], batch["error"]) if e]


def _batches(iterator, dist: _Dist, skipped_errors: list, *, batch_size: int, **kw):
    """Yield full batches while *every* worker still has one.

    Rows that are not trained on (the short last batch, and what a worker has
    left when another one ran out) are still read to the end, so that their
    decode errors land in ``skipped_errors``: every bad row is counted, not
    only those that happened to fall in a trained batch.
    """
    it = iter(iterator.iter_torch_batches(collate_fn=torch_collate(), batch_size=batch_size, drop_last=False, **kw))
    while True:
        batch = next(it, None)
        full = batch is not None and len(batch["image_id"]) == batch_size
        if not dist.all_have(full):
            for rest in ([batch] if batch is not None else []) + list(it):
                skipped_errors += _error_rows(rest)
            return
        yield batch


def _say(message: str) -> None:
    """One line to the driver's console. Not ``print``: Ray Train patches it in
    workers to also log at INFO, which shows every line twice."""
    sys.stdout.write(f"[mlray] {message}\n")
    sys.stdout.flush()


def _wrap(model: torch.nn.Module, world: int):
    if world == 1:
        return model
    from ray.train.torch import prepare_model

    return prepare_model(model, move_to_device=False, parallel_strategy="ddp")


def train_loop_per_worker(loop_cfg: dict) -> None:
    """The per-worker recipe; runs inside each Ray Train worker."""
    import json

    import ray
    import ray.train
    import ray.train.torch

    from mlray.augment import preprocess
    from mlray.losses import create_loss
    from mlray.metrics import collapse_report, format_collapse, multilabel_metrics
    from mlray.models import create_model, freeze_norm_stats, init_head, normalization, param_groups, set_trainable
    from mlray.thresholds import tune

    from mlray.runtime import quiet_train_reports

    quiet_train_reports()  # one line per epoch is ours; no echo of each report
    cfg = Config.model_validate(loop_cfg["config"])
    vocab, positives, n_train = loop_cfg["vocab"], loop_cfg["positives"], loop_cfg["n_train"]
    directory = loop_cfg["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    torch.manual_seed(cfg.optim.seed * 1000 + rank)
    dist = _Dist(world, device)
    nodes = len(set(dist.gather(ray.get_runtime_context().get_node_id())))
    amp = cfg.optim.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    # ---- setup
    prior = [p / n_train for p in positives]
    model = create_model(cfg.model, len(vocab))
    init_head(model, prior)
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mean, std = normalization(model)
    loss_fn = create_loss(cfg.loss, positives, n_train).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr, betas=(0.9, 0.999))
    ema = None
    if cfg.optim.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.optim.ema_decay)
    micro_per_epoch = n_train // (cfg.data.batch_size * world)
    steps_per_epoch = max(1, micro_per_epoch // cfg.optim.accumulate)
    total_steps = steps_per_epoch * cfg.optim.epochs
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    unfreeze_step = cfg.optim.freeze_epochs * steps_per_epoch

    state = _State()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(rundir.load_weights(os.path.join(d, rundir.WEIGHTS)))
            saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
            optimizer.load_state_dict(saved["optimizer"])
            if ema is not None and os.path.exists(os.path.join(d, rundir.EMA_FILE)):
                ema.module.load_state_dict(rundir.load_weights(os.path.join(d, rundir.EMA_FILE)))
            state = _State(**{k: saved[k] for k in ("epoch", "step", "best_map", "bad_epochs", "restarts", "history")})
            state.restarts += 1
        if rank == 0:
            _say(f"resumed from checkpoint at epoch {state.epoch} (step {state.step})")
    forward_model = torch.compile(model) if cfg.model.compile else model
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    phase = None
    ddp = None

    def set_lr() -> None:
        base = lr_factor(state.step, total_steps, warmup, cfg.optim.schedule)
        for g in optimizer.param_groups:
            f = base
            if not g.get("is_head", True) and unfreeze_step > 0 and warmup > 0:
                f *= min(1.0, max(0, state.step - unfreeze_step + 1) / warmup)
            g["lr"] = cfg.optim.lr * g.get("lr_scale", 1.0) * f

    for epoch in range(state.epoch, cfg.optim.epochs):
        # ---- train_epoch
        want = "head" if epoch < cfg.optim.freeze_epochs else (cfg.optim.unfreeze_stages or "all")
        if want != phase:
            trainable = set_trainable(model, want)
            ddp = _wrap(forward_model, world)
            phase = want
            if rank == 0:
                _say(f"epoch {epoch + 1}: training {want} ({trainable:,} parameters)")
        model.train()
        freeze_norm_stats(model, all_layers=cfg.model.freeze_bn_stats)
        t0 = time.time()
        seen = loss_sum = batches = 0
        bad: list[tuple[str, str]] = []
        micro = 0
        wait = first_wait = 0.0
        t_ready = time.time()
        for batch in _batches(
            train_shard, dist, bad, batch_size=cfg.data.batch_size,
            local_shuffle_buffer_size=loop_cfg["shuffle_buffer_rows"], prefetch_batches=cfg.data.prefetch_batches,
        ):
            waited = time.time() - t_ready
            first_wait = waited if batches == 0 else first_wait
            wait += waited
            errors = batch["error"]
            ok = np.array([e == "" for e in errors])
            if not ok.all():
                bad += _error_rows(batch)
            images = batch["image"][torch.from_numpy(ok)] if not ok.all() else batch["image"]
            targets = batch["target"][torch.from_numpy(ok)] if not ok.all() else batch["target"]
            x = preprocess(images, device, mean, std, cfg.data.augment)
            y = targets.to(device, non_blocking=True).float()
            last = (micro + 1) % cfg.optim.accumulate == 0
            sync = contextlib.nullcontext() if (last or world == 1) else ddp.no_sync()
            with sync:
                with autocast():
                    logits = ddp(x)
                loss = loss_fn(logits, y) / cfg.optim.accumulate
                loss.backward()
            micro += 1
            if last:
                set_lr()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                if ema is not None:
                    ema.update(model, step=state.step)
            seen += len(y)
            loss_sum += loss.item() * cfg.optim.accumulate * len(y)
            batches += 1
            t_ready = time.time()
        train_time = time.time() - t0
        total_seen, total_loss, total_bad = dist.sum([seen, loss_sum, len(bad)])

        # ---- validate
        eval_model = ema.module if ema is not None else model
        eval_model.eval()
        scores, targets = [], []
        val_loss_sum = 0.0
        with torch.inference_mode():
            for batch in val_shard.iter_torch_batches(
                batch_size=cfg.data.batch_size, prefetch_batches=2, collate_fn=torch_collate()
            ):
                ok = np.array([e == "" for e in batch["error"]])
                bad += _error_rows(batch)
                if not ok.any():
                    continue
                sel = torch.from_numpy(ok)
                x = preprocess(batch["image"][sel], device, mean, std)
                y = batch["target"][sel]
                with autocast():
                    logits = eval_model(x).float()
                val_loss_sum += loss_fn(logits, y.to(device).float()).item() * len(y)
                scores.append(torch.sigmoid(logits).cpu().numpy())
                targets.append(y.numpy())
        local = (
            np.concatenate(scores) if scores else np.zeros((0, len(vocab)), np.float32),
            np.concatenate(targets) if targets else np.zeros((0, len(vocab)), np.uint8),
            bad,
        )
        gathered = dist.gather(local)
        val_scores = np.concatenate([g[0] for g in gathered])
        val_targets = np.concatenate([g[1] for g in gathered])
        all_bad = [b for g in gathered for b in g[2]]
        val_loss = dist.sum([val_loss_sum])[0] / max(len(val_scores), 1)
        policy = tune(val_scores, val_targets, cfg.thresholds)
        m = multilabel_metrics(val_scores, val_targets, 0.5, prior=prior)
        val_pred = policy.predict(val_scores)
        tuned = multilabel_metrics(val_scores, val_targets, policy.thresholds, prior=prior, predictions=val_pred)
        collapse = collapse_report(tuned, val_scores, policy.thresholds, vocab, val_targets, predictions=val_pred)
        n_seen_all = total_seen + len(val_scores) + len(all_bad)
        if all_bad and len(all_bad) > cfg.data.max_error_fraction * max(n_seen_all, 1):
            listing = "\n  ".join(f"{i}: {e}" for i, e in all_bad[:50])
            raise RuntimeError(
                f"{len(all_bad)} images could not be decoded in epoch {epoch + 1}, more than "
                f"data.max_error_fraction={cfg.data.max_error_fraction} of {n_seen_all}:\n  {listing}"
            )
        record = {
            "epoch": epoch + 1,
            "phase": str(phase),
            "train_loss": total_loss / max(total_seen, 1),
            "val_loss": val_loss,
            "val_mAP": m["mAP"],
            "val_micro_AP": m["micro_AP"],
            "val_f1_micro@0.5": m["f1_micro"],
            "val_f1_macro@0.5": m["f1_macro"],
            "val_hamming_loss@0.5": m["hamming_loss"],
            "val_f1_micro": tuned["f1_micro"],
            "val_f1_macro": tuned["f1_macro"],
            "val_hamming_loss": tuned["hamming_loss"],
            "val_subset_accuracy": tuned["subset_accuracy"],
            "val_pred_per_image": tuned["pred_per_image"],
            "prior_mAP": m["prior.mAP"],
            "images_per_s": total_seen / max(train_time, 1e-9),
            # the share of the epoch spent waiting for input: near 0 means compute-bound
            "input_wait": wait / max(train_time, 1e-9),
            # of which: the epoch's stream starting up (read, first decode) before its first batch
            "first_batch_s": first_wait,
            "decode_errors": int(total_bad),
            "collapsed": collapse["collapsed"],
            "restarts": state.restarts,
            "workers": world,
            "nodes": nodes,
            "lr": optimizer.param_groups[-1]["lr"],
        }
        state.history.append(record)
        improved = record["val_mAP"] > state.best_map + 1e-6
        if improved:
            state.best_map, state.bad_epochs = record["val_mAP"], 0
        else:
            state.bad_epochs += 1
        state.epoch = epoch + 1
        stop = cfg.optim.early_stop_patience is not None and state.bad_epochs >= cfg.optim.early_stop_patience
        if rank == 0:
            _say(
                f"epoch {epoch + 1}/{cfg.optim.epochs} loss {record['train_loss']:.4f} "
                f"val_loss {val_loss:.4f} val mAP {record['val_mAP']:.4f} (prior {record['prior_mAP']:.4f}) "
                f"F1 micro {record['val_f1_micro']:.4f} @tuned / {record['val_f1_micro@0.5']:.4f} @0.5 "
                f"{record['images_per_s']:.1f} img/s (input wait {record['input_wait']:.0%}, "
                f"{record['first_batch_s']:.1f} s of it before the first batch)"
                + (" *best*" if improved else "")
            )
            if collapse["collapsed"]:
                _say(format_collapse(collapse))
            for i, e in all_bad[:10]:
                _say(f"decode error {i}: {e}")

        # ---- save_checkpoint
        weights = (ema.module if ema is not None else model).state_dict()
        if rank == 0:
            rundir.write_history(directory, state.history)
            if improved:
                rundir.save_weights(storage.join(directory, rundir.WEIGHTS), weights)
                storage.write_text(storage.join(directory, rundir.THRESHOLDS), policy.to_json())
                storage.write_text(
                    storage.join(directory, rundir.BEST),
                    json.dumps({"epoch": epoch + 1, "val": {k: v for k, v in tuned.items()}, "record": record}, indent=1),
                )
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                with open(os.path.join(tmp, rundir.WEIGHTS), "wb") as f:
                    f.write(rundir.weights_bytes(model.state_dict()))
                if ema is not None:
                    with open(os.path.join(tmp, rundir.EMA_FILE), "wb") as f:
                        f.write(rundir.weights_bytes(ema.module.state_dict()))
                torch.save({"optimizer": optimizer.state_dict(), **state.__dict__}, os.path.join(tmp, STATE_FILE))
                with open(os.path.join(tmp, rundir.THRESHOLDS), "w") as f:
                    f.write(policy.to_json())
                with open(os.path.join(tmp, rundir.CONFIG), "w") as f:
                    f.write(cfg.to_yaml())
                with open(os.path.join(tmp, rundir.LABELS), "w") as f:
                    f.write(rundir.labels_doc(vocab, positives, n_train))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))}, checkpoint=checkpoint)
        if stop:
            if rank == 0:
                _say(f"early stop: no val mAP gain for {state.bad_epochs} epochs")
            break

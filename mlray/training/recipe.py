"""One training worker's recipe: the model, the epoch loop, validation and checkpoints.

torchtune-style: ``Recipe.setup`` builds the model, loss and optimiser from the
config (restoring a checkpoint when given one); ``Recipe.train`` runs the epochs
(``train_epoch``, ``validate``, ``epoch_record``, ``save_checkpoint``);
``cleanup`` frees the device. It takes plain iterables of batches (dicts of
``image`` uint8 NHWC or ``encoded`` bytes, ``target``, ``image_id``, ``error``)
and a ``Dist`` for the collectives, so all of it runs and is tested without Ray;
``mlray.training.trainer`` wires it to Ray Train.

Workers get the same number of steps: Ray's equal split gives them the same
number of rows, but not always the same number of batches (ray-project/ray
#66085). An epoch that streams is known to end only when it ends, so before each
of its steps the workers agree that all of them still have a batch: one vote
host to host, on a gloo group (``Dist``), which never waits for the GPU. An
epoch replayed from the cache knows its rows: the workers agree once how many
full batches all of them have, and step that many times without asking.

A step never changes shape: rows that failed to decode stay in their batch with
loss weight 0 (``training.losses``), so ``torch.compile`` never recompiles on
one rank while the others wait in NCCL, and no boolean mask makes the host
wait on the device. ``cudnn.benchmark`` is on for the GPU: input sizes are fixed.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from mlray.config import Config, training_facts
from mlray.data import cache
from mlray.model import rundir

STATE_FILE = "train_state.pt"


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


class Dist:
    """The few collectives the loop needs; no-ops on one worker (``world`` 1).

    They exchange host values (flags, counts, sums, objects), so they run host to
    host on a gloo group of their own, made here (every rank constructs its
    ``Dist`` at the same point): on the NCCL group of GPU training each would copy
    its value to the GPU and read it back, a sync that waits for every kernel
    queued before it. ``votes`` counts the agreements asked (``all_have``,
    ``agree_min``)."""

    def __init__(self, world: int, device: torch.device):
        self.world, self.device = world, device
        self.votes = 0
        self.group = torch.distributed.new_group(backend="gloo") if world > 1 else None

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over the workers."""
        self.votes += 1
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def all_have(self, has: bool) -> bool:
        """Whether every worker says ``has``."""
        return self.agree_min(1 if has else 0) > 0

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, group=self.group)
        return t.tolist()

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out


def _error_rows(batch: dict) -> list[tuple[str, str]]:
    """(image id, reason) of the rows of a batch that could not be decoded."""
    return [(i, e) for i, e in zip(batch["image_id"], batch["error"]) if e]


def _masked_rows(batch: dict, ok: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, targets, per-row loss weight) of a batch, every row kept, so the
    step's shapes never change. Rows that failed to decode get weight 0 and the
    pixels of the batch's first good row (zeros would enter BatchNorm's batch
    statistics); with no good row the batch stays as it is, all weights 0. The
    usual batch, all rows decoded, passes as it is with weight None: no copy,
    nothing sent to the device."""
    from mlray.model.augment import to_device

    if ok.all():
        return batch["image"], batch["target"], None
    images = batch["image"]
    if ok.any():
        source = np.where(ok, np.arange(len(ok)), int(np.argmax(ok)))
        images = images[to_device(torch.from_numpy(source), images.device)]  # a gather: no sync, unlike a mask
    return images, batch["target"], to_device(torch.from_numpy(ok.astype(np.float32)), device)


class InputClock:
    """Iterates over a stream of batches, adding up the seconds spent blocked on
    its next batch (``wait``; ``first_wait``: the first one, the stream starting
    up): input wait, and nothing else (not the step agreement, not the step)."""

    def __init__(self, source: Iterable[dict]):
        self._it = iter(source)
        self.wait = self.first_wait = 0.0
        self.batches = 0

    def __iter__(self) -> "InputClock":
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        try:
            batch = next(self._it)
        finally:
            waited = time.perf_counter() - t0
            self.wait += waited
        if self.batches == 0:
            self.first_wait = waited
        self.batches += 1
        return batch


def _next_full(it, batch_size: int, decoded, skipped_errors: list) -> dict | None:
    """The next full batch of a stream, or None at its end. A short batch is not
    always the last: with a local shuffle buffer larger than what is left, Ray Data
    hands out the remainder first. Short ones are not trained on; their decode
    errors are still counted."""
    for batch in it:
        if len(batch["image_id"]) == batch_size:
            return batch
        skipped_errors += _error_rows(decoded(batch))
    return None


def _batches(source, dist: Dist, skipped_errors: list, *, batch_size: int, decoded=lambda b: b,
             steps: int | None = None):
    """Yield full batches of ``source`` (``batch_size`` rows), the same number on
    every worker.

    ``steps``: how many full batches every worker is known to have (a replayed
    epoch, counted once for all of them): that many are yielded without asking.
    None (a streamed epoch, whose end is known only when it comes): before each
    batch the workers agree that every one of them still has one (``Dist.all_have``).

    Rows that are not trained on (short batches, wherever they come, and what a worker has
    left when another one ran out) are still read to the end, so that their
    decode errors land in ``skipped_errors``: every bad row is counted, not
    only those that happened to fall in a trained batch.
    """
    it = iter(source)
    done = 0
    while True:
        if steps is None:
            batch = _next_full(it, batch_size, decoded, skipped_errors)
            full = batch is not None
            go = dist.all_have(full)
        else:
            batch = next(it, None)
            full = batch is not None and len(batch["image_id"]) == batch_size
            go = done < steps
            if go and not full:
                raise RuntimeError(f"this worker's epoch ended after {done} full batches of {batch_size}, "
                                   f"though every worker was agreed to have {steps}")
        if not go:
            for rest in ([batch] if batch is not None else []) + list(it):
                skipped_errors += _error_rows(decoded(rest))
            return
        done += 1
        yield batch


def _commit_caches(caches: list, dist: Dist, rank: int, limit: int, disk_limit: int, epoch: int) -> None:
    """After the first recorded epoch: replay only if every worker kept all its rows (in memory or on disk)."""
    everyone = dist.all_have(all(c.complete for c in caches))
    for c in caches:
        c.commit(everyone)
    if rank == 0:
        if everyone:
            held = sum(c.nbytes for c in caches) / 2**20
            spilled = sum(c.disk_bytes for c in caches) / 2**20
            where = " and ".join(
                ([f"memory ({held:,.0f} MB per worker)"] if held >= 1 or not spilled else [])
                + ([f"local disk ({spilled:,.0f} MB per worker, in {caches[0].directory})"] if spilled else []))
            _say(f"from epoch {epoch + 2} on, the rows epoch {epoch + 1} streamed are replayed from {where} "
                 f"in a new order each epoch: no reading or decoding")
        else:
            _say(f"every epoch streams and decodes its images: a worker's rows did not fit its "
                 f"{limit / 2**20:,.0f} MB in memory and {disk_limit / 2**20:,.0f} MB on local disk for them "
                 f"(data.cache_mb, data.cache_disk_mb; raise either to keep them)")


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


@dataclass
class EpochStats:
    """What one worker saw in ``train_epoch``; summed over workers by ``Recipe.epoch_record``."""

    seen: int = 0
    loss_sum: float = 0.0
    batches: int = 0
    wait: float = 0.0
    first_wait: float = 0.0
    seconds: float = 0.0
    dropped_micro: int = 0
    bad: list = field(default_factory=list)


@dataclass
class ValResult:
    scores: np.ndarray
    targets: np.ndarray
    loss: float
    bad: list


class Recipe:
    """One worker's recipe: ``setup``, then per epoch ``train_epoch``, ``validate``,
    ``epoch_record``, ``save_checkpoint``; ``cleanup`` at the end.

    It takes plain iterables of batches (dicts of ``image`` uint8 NHWC, ``target``,
    ``image_id`` and ``error``) and a ``Dist`` for the collectives, so the steps
    run and are tested without Ray; ``train_loop_per_worker`` wires it to Ray Train.
    """

    def __init__(self, cfg: Config, vocab: list[str], positives: list[int], n_train: int, *,
                 device: torch.device, dist: "Dist", rank: int = 0):
        from mlray.model.factory import amp_dtype

        self.cfg, self.vocab, self.positives, self.n_train = cfg, vocab, positives, n_train
        self.device, self.dist, self.rank = device, dist, rank
        self.prior = [p / n_train for p in positives]
        self.state = _State()
        dtype = amp_dtype(cfg.optim.amp, device)
        self.autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else contextlib.nullcontext
        # fp16 overflows where bf16 does not: its gradients need loss scaling
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        if device.type == "cuda":
            # every step has the same shapes (bad rows are masked, not dropped): cuDNN
            # times its convolution algorithms once, at the first step, and keeps the fastest
            torch.backends.cudnn.benchmark = True
        if dtype is not None and rank == 0:
            _say(f"mixed precision: {str(dtype).removeprefix('torch.')} autocast"
                 + (" with loss scaling (this GPU has no native bf16)" if self.scaler else ""))
        self.phase = None
        self.ddp = None
        self.decoder = None  # made at the first batch of encoded bytes (data.decode device)

    def decoded(self, batch: dict) -> dict:
        """A batch with ``image`` on this worker's device: batches of encoded bytes
        (data.decode device) are decoded here, nvJPEG on a GPU; others pass as they are."""
        if "encoded" not in batch:
            return batch
        if self.decoder is None:
            from mlray.model.device_decode import Decoder

            threads = 4 if self.device.type == "cuda" else max(1, torch.get_num_threads())
            self.decoder = Decoder(self.cfg.data.image_size, self.device, threads=threads)
        images, errors = self.decoder(list(batch["encoded"]), list(batch["error"]))
        return {**{k: v for k, v in batch.items() if k != "encoded"}, "image": images,
                "error": np.array(errors, dtype=object)}

    # ---- setup
    def setup(self, checkpoint: Callable[[str], bytes | None] | None = None) -> None:
        """Model, loss and optimiser; restored from ``checkpoint`` (a ``checkpoint_reader``) when given."""
        from mlray.training.losses import create_loss
        from mlray.model.factory import create_model, init_head, normalization, param_groups

        cfg = self.cfg
        torch.manual_seed(cfg.optim.seed * 1000 + self.rank)
        model = create_model(cfg.model, len(self.vocab))
        init_head(model, self.prior)
        model = model.to(self.device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.mean, self.std = normalization(model)
        self.loss_fn = create_loss(cfg.loss, self.positives, self.n_train).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr, betas=(0.9, 0.999))
        self.ema = None
        if cfg.optim.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.optim.ema_decay)
        micro_per_epoch = self.n_train // (cfg.data.batch_size * self.dist.world)
        self.steps_per_epoch = max(1, micro_per_epoch // cfg.optim.accumulate)
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.warmup = int(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.unfreeze_step = cfg.optim.freeze_epochs * self.steps_per_epoch
        if checkpoint is not None:
            self._restore(checkpoint)

    def _restore(self, read: Callable[[str], bytes | None]) -> None:
        from safetensors.torch import load

        self.model.load_state_dict(load(read(rundir.WEIGHTS)))
        saved = torch.load(io.BytesIO(read(STATE_FILE)), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        ema = read(rundir.EMA_FILE) if self.ema is not None else None
        if ema is not None:
            self.ema.module.load_state_dict(load(ema))
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])  # fp16's loss scale, as it had grown or backed off
        self.state = _State(**{k: saved[k] for k in ("epoch", "step", "best_map", "bad_epochs", "restarts", "history")})
        self.state.restarts += 1

    def _set_lr(self) -> None:
        cfg, step = self.cfg, self.state.step
        base = lr_factor(step, self.total_steps, self.warmup, cfg.optim.schedule)
        for g in self.optimizer.param_groups:
            f = base
            if not g.get("is_head", True) and self.unfreeze_step > 0 and self.warmup > 0:
                f *= min(1.0, max(0, step - self.unfreeze_step + 1) / self.warmup)
            g["lr"] = cfg.optim.lr * g.get("lr_scale", 1.0) * f

    def _enter_phase(self, epoch: int) -> None:
        from mlray.model.factory import set_trainable

        want = "head" if epoch < self.cfg.optim.freeze_epochs else (self.cfg.optim.unfreeze_stages or "all")
        if want != self.phase:
            trainable = set_trainable(self.model, want)
            self.ddp = _wrap(self.model, self.dist.world)
            # compiled after the DDP wrap, as torch documents it: DDPOptimizer then
            # splits the graph at the gradient buckets, so allreduce overlaps backward
            self.forward_model = torch.compile(self.ddp) if self.cfg.model.compile else self.ddp
            self.phase = want
            if self.rank == 0:
                _say(f"epoch {epoch + 1}: training {want} ({trainable:,} parameters)")

    def _optimizer_step(self) -> None:
        self._set_lr()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.step)

    # ---- train_epoch
    def train_epoch(self, epoch: int, batches, clock: InputClock | None = None) -> EpochStats:
        """Steps over ``batches``. Rows that failed to decode are listed and weigh 0 in
        the loss (a batch keeps its shape); a batch with no good row still runs
        forward and backward with a zero loss, so DDP workers stay in lockstep and
        the epoch loss stays finite. A partial accumulation group at the end is
        dropped (its gradient zeroed): the LR schedule counts whole groups, and an
        unsynchronised DDP gradient must not be stepped or carried into the next
        epoch. ``clock``: the ``InputClock`` that ``batches`` draws from, when the
        caller wrapped the stream before something that is not input (the step
        agreement of ``_batches``); by default ``batches`` is timed as it comes."""
        from mlray.model.augment import preprocess, to_device
        from mlray.model.factory import freeze_norm_stats

        cfg, accumulate = self.cfg, self.cfg.optim.accumulate
        self._enter_phase(epoch)
        self.model.train()
        freeze_norm_stats(self.model, all_layers=cfg.model.freeze_bn_stats)
        if clock is None:
            batches = clock = InputClock(batches)
        st = EpochStats()
        micro = 0
        loss_sum = torch.zeros((), device=self.device)  # summed on the device: .item() per step would sync
        t0 = time.perf_counter()
        for batch in batches:
            batch = self.decoded(batch)
            ok = np.array([e == "" for e in batch["error"]], dtype=bool)
            st.bad += _error_rows(batch)
            images, targets, weight = _masked_rows(batch, ok, self.device)
            x = preprocess(images, self.device, self.mean, self.std, cfg.data.augment)
            y = to_device(targets, self.device).float()
            last = (micro + 1) % accumulate == 0
            sync = contextlib.nullcontext() if (last or self.dist.world == 1) else self.ddp.no_sync()
            with sync:
                with self.autocast():
                    logits = self.forward_model(x)
                loss = self.loss_fn(logits, y, weight)  # the mean over the good rows; 0 without any
                scaled = loss / accumulate
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            micro += 1
            if last:
                self._optimizer_step()
            n_ok = int(ok.sum())
            st.seen += n_ok
            loss_sum += loss.detach().float() * n_ok
            st.batches += 1
        if micro % accumulate:
            self.optimizer.zero_grad(set_to_none=True)
            st.dropped_micro = micro % accumulate
        st.loss_sum = float(loss_sum.item())
        st.seconds = time.perf_counter() - t0
        st.wait, st.first_wait = clock.wait, clock.first_wait
        return st

    # ---- validate
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def validate(self, batches) -> ValResult:
        """Scores of this worker's validation rows (no collectives: shards may differ in size).
        Every row of a batch is scored (one shape); those that failed to decode are
        dropped from the scores on the host, which reads them anyway."""
        from mlray.model.augment import preprocess, to_device

        model = self.eval_model()
        model.eval()
        scores, targets, bad = [], [], []
        loss_sum = torch.zeros((), device=self.device)
        with torch.inference_mode():
            for batch in batches:
                batch = self.decoded(batch)
                ok = np.array([e == "" for e in batch["error"]], dtype=bool)
                bad += _error_rows(batch)
                if not ok.any():
                    continue
                x = preprocess(batch["image"], self.device, self.mean, self.std)
                with self.autocast():
                    logits = model(x).float()
                weight = None if ok.all() else to_device(torch.from_numpy(ok.astype(np.float32)), self.device)
                y = batch["target"]
                loss_sum += self.loss_fn(logits, to_device(y, self.device).float(), weight) * int(ok.sum())
                scores.append(torch.sigmoid(logits).cpu().numpy()[ok])
                targets.append(y.numpy()[ok])
        c = len(self.vocab)
        return ValResult(
            np.concatenate(scores) if scores else np.zeros((0, c), np.float32),
            np.concatenate(targets) if targets else np.zeros((0, c), np.uint8),
            float(loss_sum.item()), bad,
        )

    def epoch_record(self, epoch: int, st: EpochStats, val: ValResult):
        """Gather every worker's epoch (the collectives of an epoch live here) and
        compute the metric set, thresholds and collapse check. Returns
        (record, policy, tuned metrics, collapse report, all bad rows)."""
        from mlray.evaluation.validation import tune_and_judge

        cfg, dist = self.cfg, self.dist
        total_seen, total_loss, total_bad = dist.sum([st.seen, st.loss_sum, len(st.bad)])
        gathered = dist.gather((val.scores, val.targets, st.bad + val.bad))
        val_scores = np.concatenate([g[0] for g in gathered])
        val_targets = np.concatenate([g[1] for g in gathered])
        all_bad = [b for g in gathered for b in g[2]]
        val_loss = dist.sum([val.loss])[0] / max(len(val_scores), 1)
        n_seen_all = total_seen + len(val_scores) + len(all_bad)
        if all_bad and len(all_bad) > cfg.data.max_error_fraction * max(n_seen_all, 1):
            listing = "\n  ".join(f"{i}: {e}" for i, e in all_bad[:50])
            raise RuntimeError(
                f"{len(all_bad)} images could not be decoded in epoch {epoch + 1}, more than "
                f"data.max_error_fraction={cfg.data.max_error_fraction} of {n_seen_all}:\n  {listing}"
            )
        judged = tune_and_judge(val_scores, val_targets, cfg.thresholds, self.prior)
        self.val_scores = val_scores  # every worker's: the validation profile saved with a new best
        record = {
            "epoch": epoch + 1,
            "phase": str(self.phase),
            "train_loss": total_loss / max(total_seen, 1),
            "val_loss": val_loss,
            **judged.record(),
            "images_per_s": total_seen / max(st.seconds, 1e-9),
            # the share of the epoch spent waiting for input: near 0 means compute-bound
            "input_wait": st.wait / max(st.seconds, 1e-9),
            # of which: the epoch's stream starting up (read, first decode) before its first batch
            "first_batch_s": st.first_wait,
            "train_images": int(total_seen),
            "decode_errors": int(total_bad),
            "restarts": self.state.restarts,
            "workers": dist.world,
            "lr": self.optimizer.param_groups[-1]["lr"],
        }
        collapse = judged.collapse(self.vocab, [*self.state.history, record], training_facts(cfg))
        record["collapsed"] = collapse["collapsed"]
        return record, judged.policy, judged.metrics, collapse, all_bad

    def finish_epoch(self, record: dict) -> tuple[bool, bool]:
        """Book-keeping after validation: (improved, stop early)."""
        st = self.state
        st.history.append(record)
        improved = record["val_mAP"] > st.best_map + 1e-6
        if improved:
            st.best_map, st.bad_epochs = record["val_mAP"], 0
        else:
            st.bad_epochs += 1
        st.epoch = record["epoch"]
        patience = self.cfg.optim.early_stop_patience
        return improved, patience is not None and st.bad_epochs >= patience

    # ---- train: the epoch loop
    def train(self, train_batches: Callable[[], Iterable[dict]], val_batches: Callable[[], Iterable[dict]], *,
              run_dir: str, report: Callable[[dict, str | None], None], workers_on_node: int = 1,
              record_extra: dict | None = None) -> None:
        """Every epoch left (from ``state.epoch``): train, validate, record, checkpoint.

        ``train_batches()`` / ``val_batches()`` give this worker's stream of one
        epoch (called for the epochs that stream; later epochs replay the rows the
        first one streamed, ``mlray.data.cache``). ``report(metrics, directory)`` is
        called once an epoch on every worker (they must all report as often); rank 0
        passes the directory of the resumable checkpoint, valid during the call.
        ``record_extra`` is added to every history record (e.g. ``nodes``)."""
        from mlray.evaluation.metrics import format_collapse

        cfg, dist, rank, bs = self.cfg, self.dist, self.rank, self.cfg.data.batch_size
        # The first epoch this process runs records its rows (unless it is the last); then the workers agree, once.
        later = self.state.epoch + 1 < cfg.optim.epochs
        limit = cache.limit_bytes(cfg.data.cache_mb, workers_on_node) if later else 0
        spill_dir = cache.cache_directory(cfg.data.cache_dir) if later else None
        disk_limit = cache.disk_limit_bytes(cfg.data.cache_disk_mb, spill_dir, workers_on_node) if later else 0
        train_cache = cache.EpochCache(limit, disk_limit=disk_limit, directory=spill_dir, seed=cfg.optim.seed, rank=rank)
        val_cache = cache.EpochCache(limit, disk_limit=disk_limit, directory=spill_dir, rank=rank)
        to_commit = limit > 0 or disk_limit > 0
        replay_steps = None
        for epoch in range(self.state.epoch, cfg.optim.epochs):
            skipped: list = []
            replay = train_cache.ready
            if replay and replay_steps is None:
                # each worker replays the rows it recorded: agree once on the full batches all of them have
                replay_steps = dist.agree_min(train_cache.rows // bs)
            clock = InputClock(train_cache.replay(epoch, bs) if replay else train_cache.record(train_batches()))
            stats = self.train_epoch(epoch, _batches(clock, dist, skipped, batch_size=bs, decoded=self.decoded,
                                                     steps=replay_steps if replay else None), clock)
            stats.bad += skipped
            val_cache.limit = limit - train_cache.nbytes  # one budget for both splits, in memory and on disk
            val_cache.disk_limit = disk_limit - train_cache.disk_bytes
            val = self.validate(val_cache.replay(None, bs) if replay else val_cache.record(val_batches()))
            record, policy, tuned, collapse, all_bad = self.epoch_record(epoch, stats, val)
            record.update(record_extra or {})
            spilled = replay and train_cache.disk_bytes + val_cache.disk_bytes > 0
            record["input_from_memory"] = replay and not spilled
            record["input_from_disk"] = spilled
            improved, stop = self.finish_epoch(record)
            if rank == 0:
                _say(
                    f"epoch {epoch + 1}/{cfg.optim.epochs} loss {record['train_loss']:.4f} "
                    f"val_loss {record['val_loss']:.4f} val mAP {record['val_mAP']:.4f} (prior {record['prior_mAP']:.4f}) "
                    f"F1 micro {record['val_f1_micro']:.4f} @tuned / {record['val_f1_micro@0.5']:.4f} @0.5 "
                    f"{record['images_per_s']:.1f} img/s (input wait {record['input_wait']:.0%}, "
                    f"{record['first_batch_s']:.1f} s of it before the first batch"
                    + ((", images from local disk)" if spilled else ", images from memory)") if replay else ")")
                    + (" *best*" if improved else "")
                )
                if collapse["collapsed"]:
                    _say(format_collapse(collapse))
                for i, e in all_bad[:10]:
                    _say(f"decode error {i}: {e}")
            if to_commit:  # after the epoch's line, which it follows in the log
                to_commit = False
                _commit_caches([train_cache, val_cache], dist, rank, limit, disk_limit, epoch)
            metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    self.save_checkpoint(run_dir, tmp, record, policy, tuned, improved)
                report(metrics, tmp if rank == 0 else None)
            if stop:
                if rank == 0:
                    _say(f"early stop: no val mAP gain for {self.state.bad_epochs} epochs")
                break

    # ---- save_checkpoint
    def save_checkpoint(self, directory: str, tmp: str, record: dict, policy, tuned: dict, improved: bool) -> None:
        """Rank 0: the run directory (history; weights, thresholds and best.json on a
        new best) and the resumable checkpoint files in ``tmp``."""
        cfg = self.cfg
        rundir.write_history(directory, self.state.history)
        if improved:
            rundir.write_best(directory, self.eval_model().state_dict(), policy, record["epoch"], tuned, record,
                             val_scores=self.val_scores)
        with open(os.path.join(tmp, rundir.WEIGHTS), "wb") as f:
            f.write(rundir.weights_bytes(self.model.state_dict()))
        if self.ema is not None:
            with open(os.path.join(tmp, rundir.EMA_FILE), "wb") as f:
                f.write(rundir.weights_bytes(self.ema.module.state_dict()))
        scaler = {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}
        torch.save({"optimizer": self.optimizer.state_dict(), **scaler, **self.state.__dict__},
                   os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, rundir.THRESHOLDS), "w") as f:
            f.write(policy.to_json())
        with open(os.path.join(tmp, rundir.CONFIG), "w") as f:
            f.write(cfg.to_yaml())
        with open(os.path.join(tmp, rundir.LABELS), "w") as f:
            f.write(rundir.labels_doc(self.vocab, self.positives, self.n_train))

    # ---- cleanup
    def cleanup(self) -> None:
        """Drop the model and optimiser before the worker exits (frees device memory
        for a restart in the same process)."""
        self.ddp = self.forward_model = self.model = self.optimizer = self.ema = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

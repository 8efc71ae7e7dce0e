"""The training recipe's steps, run without Ray: accumulation at the end of an
epoch, batches whose rows all failed to decode, validation. Those that train a few
steps of a real model are in the slow tier."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from mlray.config import build_config
from mlray.training.recipe import Dist, Recipe

C = 4


def _recipe(max_error_fraction=0.01, **optim):
    cfg = build_config({
        "data": {"manifest": "unused", "image_size": 32, "batch_size": 4, "max_error_fraction": max_error_fraction},
        "model": {"pretrained": "none", "channels_last": False},
        "optim": {"epochs": 2, "freeze_epochs": 0, "warmup_epochs": 0, **optim},
        "run": {"name": "recipe"},
    })
    recipe = Recipe(cfg, [f"l{i}" for i in range(C)], [3, 2, 2, 1], 16, device=torch.device("cpu"),
                    dist=Dist(1, torch.device("cpu")))
    recipe.setup()
    return recipe


def _batch(i, n=4, errors=()):
    g = torch.Generator().manual_seed(i)
    return {
        "image": torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g),
        "target": torch.randint(0, 2, (n, C), dtype=torch.uint8, generator=g),
        "image_id": np.array([f"b{i}_{j}" for j in range(n)], dtype=object),
        "error": np.array(["decode: broken" if j in errors else "" for j in range(n)], dtype=object),
    }


def _grads(model):
    return [p.grad for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0]


@pytest.mark.slow  # trains a few steps
def test_partial_accumulation_group_is_not_carried_into_the_next_epoch():
    recipe = _recipe(accumulate=2)
    stats = recipe.train_epoch(0, [_batch(i) for i in range(3)])  # one whole group and one half
    assert recipe.state.step == 1 and stats.dropped_micro == 1
    assert _grads(recipe.model) == []  # the half group's gradient is gone
    before = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    recipe.train_epoch(1, [_batch(9)])  # one micro-batch of a new group: no step yet
    assert recipe.state.step == 1
    after = recipe.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow  # trains a few steps
def test_a_batch_whose_rows_all_failed_keeps_the_epoch_loss_finite():
    recipe = _recipe(max_error_fraction=0.5)
    batches = [_batch(0), _batch(1, errors=range(4)), _batch(2, errors=(0,))]
    stats = recipe.train_epoch(0, batches)
    assert math.isfinite(stats.loss_sum) and stats.loss_sum > 0
    assert stats.seen == 4 + 0 + 3 and stats.batches == 3
    assert sorted(i for i, _ in stats.bad) == ["b1_0", "b1_1", "b1_2", "b1_3", "b2_0"]
    val = recipe.validate([_batch(5), _batch(6, errors=range(4)), _batch(7, errors=(1, 2))])
    assert val.scores.shape == (6, C) and val.targets.shape == (6, C) and len(val.bad) == 6
    record, policy, tuned, collapse, bad = recipe.epoch_record(0, stats, val)
    assert math.isfinite(record["train_loss"]) and record["decode_errors"] == 5
    assert len(bad) == 11 and record["epoch"] == 1


@pytest.mark.slow  # trains a few steps
def test_encoded_batches_decode_on_the_worker_like_decoded_ones():
    """data.decode=device: batches carry encoded bytes and the worker decodes them
    (nvJPEG on a GPU, the same Pillow decoder here). Lossless PNGs of the images
    of decoded batches train to the same loss; bad bytes become counted error rows."""
    import io

    from PIL import Image

    def encoded(batch, bad=()):
        blobs = []
        for j, img in enumerate(batch["image"].numpy()):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            blobs.append(b"not an image" if j in bad else buf.getvalue())
        return {**{k: v for k, v in batch.items() if k != "image"}, "encoded": np.array(blobs, dtype=object)}

    plain = [_batch(i) for i in range(3)]
    st_a = _recipe().train_epoch(0, plain)  # each recipe seeds torch in setup: build one, train it, then the next
    b = _recipe()
    st_b = b.train_epoch(0, [encoded(x) for x in plain])
    assert st_a.seen == st_b.seen == 12 and abs(st_a.loss_sum - st_b.loss_sum) < 1e-5
    out = b.decoded(encoded(_batch(7), bad=(1,)))
    assert torch.equal(out["image"][0], _batch(7)["image"][0])
    assert out["error"][1].startswith("not_an_image") and out["error"][0] == ""
    st = b.train_epoch(1, [encoded(_batch(8), bad=(2,))])
    assert st.seen == 3 and [i for i, _ in st.bad] == ["b8_2"]


def test_bad_rows_keep_the_batch_shape_and_weigh_nothing_in_the_loss():
    """Rows that failed to decode stay in the batch (a new shape would recompile a
    compiled model on one rank while the others wait in NCCL) with loss weight 0:
    the loss is the loss of the good rows alone, for every loss. The usual batch,
    all rows good, goes to the model as it came: no copy, no weights."""
    import pytest

    from mlray.config import LossConfig
    from mlray.training.losses import create_loss
    from mlray.training.recipe import _masked_rows

    cpu = torch.device("cpu")
    good = _batch(8)
    images, targets, weight = _masked_rows(good, np.ones(4, bool), cpu)
    assert images.data_ptr() == good["image"].data_ptr() and targets.data_ptr() == good["target"].data_ptr()
    assert weight is None
    bad = _batch(9, errors=(1, 3))
    ok = np.array([e == "" for e in bad["error"]])
    images, targets, weight = _masked_rows(bad, ok, cpu)
    assert images.shape == bad["image"].shape and torch.equal(targets, bad["target"])
    assert weight.tolist() == [1.0, 0.0, 1.0, 0.0]
    # a bad row carries a good row's pixels, not black ones, into BatchNorm's batch statistics
    assert torch.equal(images[[0, 2]], bad["image"][[0, 2]]) and torch.equal(images[1], bad["image"][0])

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, C, generator=g, requires_grad=True)
    y = bad["target"].float()
    for name in ("bce", "bce_weighted", "focal", "asl"):
        loss_fn = create_loss(LossConfig(name=name), [3, 2, 2, 1], 16)
        masked = loss_fn(logits, y, weight)
        assert masked.item() == pytest.approx(loss_fn(logits[[0, 2]], y[[0, 2]]).item(), rel=1e-5), name
        assert loss_fn(logits, y, torch.ones(4)).item() == pytest.approx(loss_fn(logits, y).item(), rel=1e-6)
        grad, = torch.autograd.grad(masked, logits)
        assert grad[[1, 3]].abs().sum() == 0 and grad[[0, 2]].abs().sum() > 0
        none = loss_fn(logits, y, torch.zeros(4))  # a batch without a good row: 0, and finite gradients
        assert none.item() == 0 and torch.isfinite(torch.autograd.grad(none, logits)[0]).all()

    recipe = _recipe(max_error_fraction=0.5)
    shapes = []
    recipe.model.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    stats = recipe.train_epoch(0, [_batch(0), _batch(1, errors=(0, 2)), _batch(2, errors=range(4))])
    assert shapes == [(4, 3, 32, 32)] * 3  # one shape, bad rows or not
    assert stats.seen == 4 + 2 + 0 and len(stats.bad) == 6 and math.isfinite(stats.loss_sum)


def _vote_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo workers: the step agreement of ``_batches`` over unequal shards."""
    import datetime
    import json

    from mlray.training.recipe import Dist, _batches

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    dist = Dist(2, torch.device("cpu"))

    def shard(sizes, errors_in_last=()):
        return [_batch(10 * rank + i, n=n, errors=errors_in_last if i == len(sizes) - 1 else ())
                for i, n in enumerate(sizes)]

    result = {}
    # streamed: rank 0 has 4 full batches and a short one, rank 1 has 3 full batches
    skipped: list = []
    sizes = [4, 4, 4, 4, 2] if rank == 0 else [4, 4, 4]
    stepped = [b["image_id"][0] for b in _batches(shard(sizes, errors_in_last=(1,)), dist, skipped, batch_size=4)]
    result["streamed"] = {"steps": len(stepped), "skipped": [i for i, _ in skipped], "votes": dist.votes}
    # replayed: the rows are known, the workers agree once on the full batches all of them have
    sizes = [4, 4, 4, 1] if rank == 0 else [4, 4, 4, 4]
    rows = sum(sizes)
    votes = dist.votes
    steps = dist.agree_min(rows // 4)
    skipped = []
    stepped = [b["image_id"][0] for b in _batches(shard(sizes, errors_in_last=(0,)), dist, skipped, batch_size=4,
                                                 steps=steps)]
    result["replayed"] = {"steps": len(stepped), "skipped": [i for i, _ in skipped], "votes": dist.votes - votes}
    result["gathered"] = dist.gather(rank)
    result["sum"] = dist.sum([rank + 1.0])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def test_workers_with_unequal_shards_step_together_and_every_error_is_counted(tmp_path):
    """Two real gloo processes. A streamed epoch votes before each step, host to host
    (its own gloo group: no GPU sync under NCCL); a replayed one agrees once on the
    count and votes no more. Either way both workers step equally often, and the
    rows a worker does not train on are still read for their decode errors."""
    import json
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_vote_worker, args=(r, str(tmp_path / "init"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["streamed"]["steps"] == r1["streamed"]["steps"] == 3
    assert r0["streamed"]["votes"] == r1["streamed"]["votes"] == 4  # 3 yes, then one no
    # rank 0's fourth batch and short fifth are not trained on: the bad row in them is still counted
    # (rank 1's bad row sits in its third batch, trained on: the step counts it)
    assert r0["streamed"]["skipped"] == ["b4_1"] and r1["streamed"]["skipped"] == []
    assert r0["replayed"]["steps"] == r1["replayed"]["steps"] == 3
    assert r0["replayed"]["votes"] == r1["replayed"]["votes"] == 1  # the count, once; no vote per step
    assert r0["replayed"]["skipped"] == ["b3_0"] and r1["replayed"]["skipped"] == ["b13_0"]
    assert r0["gathered"] == r1["gathered"] == [0, 1] and r0["sum"] == r1["sum"] == [3.0]


def test_a_short_batch_first_does_not_end_a_streamed_epoch():
    """With a local shuffle buffer larger than the rows left, Ray Data hands out the
    remainder first (91 rows in batches of 32 came as 27, 32, 32): the epoch once
    ended there, trained 0 steps, and reported a loss of 0. Short batches are
    skipped wherever they come; their bad rows are still counted."""
    from mlray.training.recipe import Dist, _batches

    stream = [_batch(0, n=3, errors=(1,)), _batch(1), _batch(2), _batch(3, n=2)]
    skipped: list = []
    stepped = [b["image_id"][0] for b in _batches(stream, Dist(1, torch.device("cpu")), skipped, batch_size=4)]
    assert stepped == ["b1_0", "b2_0"] and [i for i, _ in skipped] == ["b0_1"]


def test_input_wait_is_the_time_blocked_on_the_next_batch_only():
    """``input wait`` counted the step agreement, which under NCCL waited for the
    previous step's GPU work: a compute-bound run looked input-bound. It is now
    the time spent blocked on the stream, and nothing else."""
    import time

    from mlray.training.recipe import InputClock, _batches

    def slow(n, delay):
        for i in range(n):
            time.sleep(delay)
            yield _batch(i)

    clock = InputClock(slow(5, 0.05))
    t0 = time.perf_counter()
    for _ in _batches(clock, Dist(1, torch.device("cpu")), [], batch_size=4):
        time.sleep(0.1)  # the step
    total = time.perf_counter() - t0
    assert 0.25 <= clock.wait < 0.25 + 0.1 and clock.batches == 5
    assert 0.05 <= clock.first_wait < 0.1 and total > 0.7
    recipe = _recipe()
    stats = recipe.train_epoch(0, slow(2, 0.2))
    assert 0.4 <= stats.wait < 0.4 + 0.15 and 0.2 <= stats.first_wait < 0.3 and stats.seconds > stats.wait


def test_grad_scaler_state_survives_a_checkpoint(tmp_path):
    """fp16 training's loss scale (grown or backed off over thousands of steps) is
    saved with the optimiser and restored on resume, not reset to 65536. The CPU
    GradScaler is the same class and state as the CUDA one."""
    recipe = _recipe()
    recipe.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    stats = recipe.train_epoch(0, [_batch(i) for i in range(3)])
    state = recipe.scaler.state_dict()
    assert state["scale"] != 2.0**10  # it moved: grown each finite step, halved after an overflow
    val = recipe.validate([_batch(5)])
    record, policy, tuned, _, _ = recipe.epoch_record(0, stats, val)
    recipe.finish_epoch(record)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    recipe.save_checkpoint(str(tmp_path / "run"), str(ckpt), record, policy, tuned, improved=True)

    def read(name):
        path = ckpt / name
        return path.read_bytes() if path.exists() else None

    resumed = _recipe()
    resumed.scaler = torch.amp.GradScaler("cpu")
    resumed._restore(read)
    assert resumed.scaler.state_dict() == state and resumed.state.epoch == 1
    plain = _recipe()  # bf16 or CPU training has no scaler: its checkpoints hold none
    plain._restore(read)
    assert plain.scaler is None


def test_a_training_worker_drives_exactly_one_gpu():
    """gpus_per_worker=2 used to validate and leave one GPU of each worker idle."""
    import pytest

    from mlray.config import ConfigError

    base = {"data": {"manifest": "unused"}, "run": {"name": "gpus"}}
    with pytest.raises(ConfigError, match=r"gpus_per_worker=2: .*raise scaling\.num_workers .*num_workers=16"):
        build_config({**base, "scaling": {"use_gpu": True, "gpus_per_worker": 2, "num_workers": 8}})
    with pytest.raises(ConfigError, match=r"gpus_per_worker=0\.5: .*NCCL"):
        build_config({**base, "scaling": {"use_gpu": True, "gpus_per_worker": 0.5}})
    assert build_config({**base, "scaling": {"use_gpu": False, "gpus_per_worker": 2}}).scaling.use_gpu is False

"""The training recipe's steps, run without Ray: accumulation at the end of an
epoch, batches whose rows all failed to decode, validation. Those that train a few
steps of a real model are in the slow tier."""

from __future__ import annotations

import math

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


def test_a_batch_whose_rows_all_decoded_is_stepped_without_a_copy():
    """The usual batch goes to the model as it came (a boolean mask would copy it,
    and make the host wait on a GPU); a batch with bad rows loses exactly those."""
    from mlray.training.recipe import _good_rows

    good = _batch(8)
    ok = np.array([e == "" for e in good["error"]])
    images, targets = _good_rows(good, ok)
    assert images.data_ptr() == good["image"].data_ptr() and targets.data_ptr() == good["target"].data_ptr()
    bad = _batch(9, errors=(1, 3))
    images, targets = _good_rows(bad, np.array([e == "" for e in bad["error"]]))
    assert torch.equal(images, bad["image"][[0, 2]]) and torch.equal(targets, bad["target"][[0, 2]])

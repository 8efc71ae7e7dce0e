"""Row order cannot matter: a manifest sorted by label streams like a shuffled one.

Label files list rows grouped by category. The training stream must mix the
whole split every epoch, whatever order the manifest stores: measured here as
the label mix of consecutive batches against that of truly random orders.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlray.io.manifest import multi_hot, read_manifest, schema_with_vocab

BATCH = 16


def _sorted_copy(manifest: str, out_file: str, *, with_images: bool) -> list[str]:
    """The manifest's rows sorted by their first label, written as one Parquet file
    in source order the way an older mlray (or another tool) wrote manifests."""
    table, vocab = read_manifest(manifest, with_images=with_images)
    first = [min((vocab.index(x) for x in labels), default=-1) for labels in table.column("labels").to_pylist()]
    table = table.take(pa.array(np.argsort(first, kind="stable")))
    table = table.cast(schema_with_vocab(table.schema, vocab))  # no row-order key: "source order"
    pq.write_table(table, out_file, row_group_size=table.num_rows)
    return vocab


def _batch_mix(targets: np.ndarray, batch: int = BATCH) -> float:
    """Mean total-variation distance between each batch's label distribution and the split's."""
    overall = targets.sum(axis=0) / targets.sum()
    dists = []
    for i in range(0, len(targets) - batch + 1, batch):
        counts = targets[i : i + batch].sum(axis=0)
        if counts.sum():
            dists.append(0.5 * np.abs(counts / counts.sum() - overall).sum())
    return float(np.mean(dists))


def _stream(manifest, vocab, epochs=2):
    """Batches as a training worker sees them, with the defaults ``mlray train`` uses."""
    from mlray.data.pipeline import image_dataset
    from mlray.data.shuffle import local_buffer_rows

    ds = image_dataset(manifest, "train", shuffle=True, seed=3, size=32, vocab=vocab, decode_batch_size=64)
    it = ds.streaming_split(1, equal=True)[0]  # the way Ray Train hands a worker its shard
    # The buffer ``mlray train`` adds for packed manifests stored in source order,
    # scaled to this small set: 2 batches (at 160 px the default holds ~870 rows).
    buffer = BATCH * 2 if local_buffer_rows(manifest, 160, None) else None
    out = []
    for _ in range(epochs):
        ids, targets = [], []
        for b in it.iter_batches(batch_size=BATCH, batch_format="numpy", local_shuffle_buffer_size=buffer):
            ids += list(b["image_id"])
            targets.append(b["target"])
        out.append((ids, np.concatenate(targets)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_sorted_manifest_streams_like_a_random_order(local_ray, mosaics, tmp_path, packed):
    from mlray.data.prepare import prepare

    root, csv_path = mosaics
    fresh = str(tmp_path / "fresh")
    prepare(csv_path, root, fresh, split="train=0.9,val=0.1", pack=packed)
    sorted_file = str(tmp_path / "sorted.parquet")
    vocab = _sorted_copy(fresh, sorted_file, with_images=packed)
    table, _ = read_manifest(sorted_file)
    train_ids = set(table.filter(pa.compute.equal(table.column("split"), "train")).column("image_id").to_pylist())
    truth = multi_hot(table.filter(pa.compute.equal(table.column("split"), "train")).column("labels"), vocab)
    rng = np.random.default_rng(0)
    random_mix = np.mean([_batch_mix(truth[rng.permutation(len(truth))]) for _ in range(200)])
    stored_mix = _batch_mix(truth)
    assert stored_mix > 1.5 * random_mix  # the file really is grouped by label

    for manifest in (sorted_file, fresh):
        epochs = _stream(manifest, vocab)
        for ids, _ in epochs:
            assert sorted(ids) == sorted(train_ids)  # every row exactly once an epoch
        mix = np.mean([_batch_mix(targets) for _, targets in epochs])
        assert mix < 1.12 * random_mix, (manifest, mix, random_mix, stored_mix)
        assert epochs[0][0] != epochs[1][0]  # a new order every epoch


@pytest.mark.slow
def test_training_on_a_sorted_manifest_matches_the_shuffled_one(local_ray, mosaics, tmp_path):
    """The user-facing promise: the same rows sorted by label train as well as shuffled."""
    from mlray.config import build_config
    from mlray.data.prepare import prepare
    from mlray.training.trainer import train

    root, csv_path = mosaics
    fresh = str(tmp_path / "fresh")
    prepare(csv_path, root, fresh, split="train=0.8,val=0.2", pack=True)
    sorted_file = str(tmp_path / "sorted.parquet")
    _sorted_copy(fresh, sorted_file, with_images=True)
    best = {}
    for name, manifest in (("sorted", sorted_file), ("shuffled", fresh)):
        cfg = build_config({
            # every epoch streams (as a split too large to keep in memory does): the stored order
            # must not reach the unfrozen epochs, where it used to collapse the fine-tune
            "data": {"manifest": manifest, "image_size": 64, "batch_size": 16, "decode_batch_size": 64,
                     "cache_mb": 0, "cache_disk_mb": 0},
            "optim": {"epochs": 3, "freeze_epochs": 1, "warmup_epochs": 0.2},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "run": {"storage_path": str(tmp_path / "runs"), "name": name},
        })
        hist = train(cfg).history
        assert not hist[-1]["collapsed"], name
        best[name] = max(h["val_mAP"] for h in hist)
        assert best[name] > hist[-1]["prior_mAP"] + 0.1, name
    # One-sided: the failure this guards against is the sorted file training worse
    # (old code: near-single-label batches, collapse). On 240 images, 3 epochs,
    # the seed-to-seed spread is ~0.1 mAP either way, so the margin is that spread.
    assert best["sorted"] > best["shuffled"] - 0.1, best


@pytest.mark.slow
def test_shuffled_read_and_decode_run_as_one_task(local_ray, mosaics, tmp_path):
    """The read and the decode fuse into one operator: each task decodes the rows it
    read (two operators would compete for the same CPU slots, and pass every block
    between them through the object store)."""
    from mlray.data.pipeline import image_dataset
    from mlray.io.manifest import read_vocab
    from mlray.data.prepare import prepare

    root, csv_path = mosaics
    manifest = str(tmp_path / "m")
    prepare(csv_path, root, manifest, split="train=0.9,val=0.1", pack=True)
    ds = image_dataset(manifest, "train", shuffle=True, size=32, vocab=read_vocab(manifest), decode_batch_size=16)
    rows = sum(len(b["image"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
    stats = ds.stats()
    operators = [line for line in stats.splitlines() if line.startswith("Operator ")]
    assert len(operators) == 1 and "ReadShuffledSplit->MapBatches(decode_rows)" in operators[0], stats[:2000]
    assert rows == sum(1 for s in read_manifest(manifest)[0].column("split").to_pylist() if s == "train")


def test_only_a_manifest_stored_in_source_order_is_warned_about(mosaics, tmp_path, caplog):
    """The 'written in source order ... re-run mlray prepare' line is for old
    manifests only; a manifest mlray prepared (rows stored shuffled) gets none."""
    import logging

    from mlray.data.prepare import prepare
    from mlray.data.shuffle import ShuffledSplit

    root, csv_path = mosaics
    fresh = str(tmp_path / "fresh")
    prepare(csv_path, root, fresh, split="train=0.9,val=0.1", pack=True)
    sorted_file = str(tmp_path / "sorted.parquet")
    _sorted_copy(fresh, sorted_file, with_images=True)
    for manifest, warned in ((fresh, False), (sorted_file, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mlray.data.shuffle"):
            ShuffledSplit(manifest, "train", ["image_id", "image", "labels"], block_rows=64, seed=0)
        assert any("source order" in r.getMessage() for r in caplog.records) == warned, (manifest, caplog.text)


# ---- the planner alone, without Ray: each epoch a new order over every row of the split once


def _manifest(tmp_path, n=96, packed=False, stored="random"):
    """A real manifest of ``n`` rows (train, val and test). Unpacked: as ``mlray prepare``
    writes it. Packed: two files of small row groups (several read units from a few
    rows), rows stored shuffled within each split and marked so (``stored="random"``),
    or in source order and unmarked, as older manifests are."""
    from mlray.io.manifest import build_table, storage_order, write_manifest

    ids = [f"img_{i:03d}.jpg" for i in range(n)]
    splits = ["train" if i % 4 else ("val" if i % 8 else "test") for i in range(n)]
    images = [bytes([i % 256]) * 300 for i in range(n)] if packed else None
    table = build_table(ids, [None if packed else f"images/{i}" for i in ids],
                        [["cat"] if i % 2 else ["dog"] for i in range(n)], splits=splits, images=images)
    out = tmp_path / f"m-{packed}-{stored}"
    if not packed:
        write_manifest(table, ["cat", "dog"], str(out))
    else:
        out.mkdir()
        row_order = None
        if stored == "random":
            table, row_order = table.take(pa.array(storage_order(splits, n, seed=1))), "random"
        table = table.cast(schema_with_vocab(table.schema, ["cat", "dog"], row_order))
        pq.write_table(table.slice(0, n // 2), out / "part-0.parquet", row_group_size=12)
        pq.write_table(table.slice(n // 2), out / "part-1.parquet", row_group_size=12)
    return str(out), {i for i, s in zip(ids, splits) if s == "train"}


def _unit_ids(planner, units) -> list[str]:
    ids = []
    for f, g, rows in units:
        group = pq.ParquetFile(planner.paths[f]).read_row_group(g, columns=["image_id"]).column("image_id")
        ids += group.take(pa.array(rows)).to_pylist()
    return ids


@pytest.mark.parametrize("packed,stored", [(False, "random"), (True, "random"), (True, "source")])
def test_each_epoch_draws_a_new_order_over_every_row_of_the_split_once(tmp_path, packed, stored):
    from mlray.data.shuffle import ShuffledSplit

    manifest, train = _manifest(tmp_path, packed=packed, stored=stored)
    planner = ShuffledSplit(manifest, "train", ["image_id", "uri", "labels", "image"], block_rows=16, seed=5)
    assert planner.packed == packed
    orders = [planner.next_order()[1] for _ in range(3)]
    n = len(orders[0])
    for order in orders:
        assert sorted(order.tolist()) == list(range(n))  # a permutation: each row (or unit) once
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    if packed:
        assert planner.table is None and n == len(planner.units)
        ids = _unit_ids(planner, [planner.units[j] for j in orders[0]])
        assert planner.n_rows == len(ids) == len(train)
    else:
        assert planner.table.column_names == ["image_id", "uri", "labels"]  # what was asked for and exists
        ids = planner.table.column("image_id").take(pa.array(orders[0])).to_pylist()
        assert ids != sorted(ids)  # mixed, not the stored order
    assert sorted(ids) == sorted(train)  # the split's rows, each once, no other split's
    if packed:
        assert {u[0] for u in planner.units} == {0, 1}  # both files
        if stored == "source":  # row groups are cut into slices, so that a read task mixes several places
            assert max(len(u[2]) for u in planner.units) < 12
        else:  # a whole row group's rows of the split are one unit, read once
            assert len({(f, g) for f, g, _ in planner.units}) == len(planner.units) == 72 // 12
            assert planner.num_tasks() < len(planner.units)  # a task reads several row groups
    else:
        assert planner.num_tasks() == -(-len(train) // 16)
    # the same seed gives the same epochs (a restarted run sees the orders it would have), another seed others
    again = ShuffledSplit(manifest, "train", ["image_id"], block_rows=16, seed=5)
    other = ShuffledSplit(manifest, "train", ["image_id"], block_rows=16, seed=6)
    assert np.array_equal(again.next_order()[1], orders[0]) and not np.array_equal(other.next_order()[1], orders[0])

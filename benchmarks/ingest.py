"""Ingest: images/s the training stream delivers, against a tuned torch DataLoader
over the same Parquet with the same number of workers, and against the raw bound.

    python -m benchmarks.ingest [--images 2400] [--size 224] [--epochs 4]

Data: 640x480 JPEGs of real photos (crops of scikit-learn's sample photos),
packed in one Parquet manifest. All three decode with ``mlray.data.images.decode``
to ``size``², then apply the training augmentation. The cases: later epochs
replayed from memory (training's default), from local disk with the page cache
dropped before each epoch (a split larger than memory), and streamed every epoch. Each case runs in its own
process, interleaved with the others over ``--rounds`` rounds; a case's steady
rate is its median epoch after the first, the first epoch (start-up included)
is reported apart, and ratios are taken round by round (median and range).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import time
import warnings

import numpy as np
import torch

from benchmarks.common import OUT, fmt_spread, fmt_table, interleaved, paired_ratio, record, spread, steady_rate

# The baseline wraps decoded (read-only) arrays without a copy, as a tuned loader would.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def photo_manifest(n: int) -> str:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from mlray.io.manifest import build_table, write_manifest

    manifest = os.path.join(OUT, f"photos_{n}", "manifest")
    if os.path.exists(manifest):
        return manifest
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(load_sample_image(p)) for p in ("china.jpg", "flower.jpg")]
    blobs, labels = [], []
    for i in range(n):
        p = photos[i % 2]
        w, h = p.size
        cw, ch = int(w * rng.uniform(0.6, 1)), int(h * rng.uniform(0.6, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = p.crop((x, y, x + cw, y + ch)).resize((640, 480))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
        labels.append(["china"] if i % 2 == 0 else ["flower"])
    ids = [f"photo_{i:05d}.jpg" for i in range(n)]
    table = build_table(ids, [None] * n, labels, splits=["train"] * n, images=blobs)
    write_manifest(table, ["china", "flower"], manifest)
    return manifest


def _augment(batch_uint8: torch.Tensor) -> torch.Tensor:
    from mlray.model.augment import preprocess
    from mlray.config import AugmentConfig

    return preprocess(batch_uint8, torch.device("cpu"), (0.5,) * 3, (0.5,) * 3, AugmentConfig())


def _drop_from_page_cache(memory) -> None:
    """Make the spilled rows cold, as a split larger than the node's memory is: written
    out, then dropped from the kernel's page cache, so the replay reads the disk."""
    if memory.file is not None:
        os.fsync(memory.file.fileno())
        os.posix_fadvise(memory.file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def mlray_stream(manifest: str, size: int, batch: int, epochs: int, augment: bool = True,
                 cache: str = "") -> list[float]:
    """Images/s of each epoch of the training stream (the first includes its start-up).
    ``cache="memory"``, as training runs by default: epochs after the first replay the
    rows from memory (``mlray.data.cache``); ``"disk"``: from local disk (no memory budget),
    the page cache dropped before every epoch; ``""``: every epoch streams."""
    import tempfile

    from mlray.data.cache import EpochCache
    from mlray.data.pipeline import image_dataset, torch_collate
    from mlray.io.manifest import read_vocab
    from mlray.runtime import init_ray

    torch.set_num_threads(1)  # augmentation is cheap; leave the cores to decoding
    init_ray()
    ds = image_dataset(manifest, "train", size=size, vocab=read_vocab(manifest), shuffle=True, decode_batch_size=128)
    memory = EpochCache(2**40 if cache == "memory" else 0, disk_limit=2**40 if cache == "disk" else 0,
                        directory=tempfile.gettempdir())
    rates = []
    for epoch in range(epochs):
        if memory.ready:
            _drop_from_page_cache(memory)
        t, n = time.perf_counter(), 0
        source = memory.replay(epoch, batch) if memory.ready else memory.record(
            ds.iter_torch_batches(batch_size=batch, prefetch_batches=4, collate_fn=torch_collate(), drop_last=False))
        for b in source:
            if len(b["image"]) < batch:  # as training does: the short last batch is not stepped
                continue
            if augment:
                _augment(b["image"])
            n += len(b["image"])
        rates.append(n / (time.perf_counter() - t))
        if epoch == 0 and cache and memory.commit(memory.complete):
            # nothing decodes any more: the cores go to the step, as in a training worker
            torch.set_num_threads(os.cpu_count() or 1)
    return rates


class _ParquetImages(torch.utils.data.Dataset):
    def __init__(self, manifest: str, size: int):
        from mlray.io.manifest import read_manifest

        table, _ = read_manifest(manifest, with_images=True)
        self.blobs = table.column("image").to_pylist()
        self.size = size

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        from mlray.data.images import decode

        return torch.from_numpy(decode(self.blobs[i], self.size))


def dataloader(manifest: str, size: int, batch: int, epochs: int, workers: int, threads: int = 1) -> list[float]:
    """Images/s of each epoch of a tuned DataLoader (persistent workers, prefetch;
    its workers decode on every core, so the main process augments on 1 thread:
    2 threads measured no faster, see the README)."""
    torch.set_num_threads(threads)
    loader = torch.utils.data.DataLoader(
        _ParquetImages(manifest, size), batch_size=batch, shuffle=True, num_workers=workers,
        persistent_workers=True, prefetch_factor=4, drop_last=True,
    )
    rates = []
    for _ in range(epochs):
        t, n = time.perf_counter(), 0
        for x in loader:
            _augment(x)
            n += len(x)
        rates.append(n / (time.perf_counter() - t))
    return rates


def _decode_chunk(args):
    from mlray.data.images import decode

    blobs, size = args
    return len([decode(b, size) for b in blobs])


def raw_bound(manifest: str, size: int, workers: int) -> float:
    from mlray.io.manifest import read_manifest

    table, _ = read_manifest(manifest, with_images=True)
    blobs = table.column("image").to_pylist()
    chunks = [(blobs[i : i + 64], size) for i in range(0, len(blobs), 64)]
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_chunk, chunks[:4])  # warm up
        t = time.perf_counter()
        n = sum(pool.map(_decode_chunk, chunks))
    return n / (time.perf_counter() - t)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2400)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    workers = os.cpu_count() or 1
    manifest = photo_manifest(args.images)
    common = (manifest, args.size, args.batch, args.epochs)
    res = interleaved({
        "mlray": ("benchmarks.ingest", "mlray_stream", *common, True),
        "mlray_cached": ("benchmarks.ingest", "mlray_stream", *common, True, "memory"),
        "mlray_disk": ("benchmarks.ingest", "mlray_stream", *common, True, "disk"),
        "dataloader": ("benchmarks.ingest", "dataloader", *common, workers),
        "mlray_decode": ("benchmarks.ingest", "mlray_stream", *common, False),
        "raw": ("benchmarks.ingest", "raw_bound", manifest, args.size, workers),
    }, args.rounds)
    steady = {k: [steady_rate(r) if isinstance(r, list) else r for r in v] for k, v in res.items()}
    first = {k: [r[0] for r in v] for k, v in res.items() if isinstance(v[0], list)}
    loader = f"torch DataLoader, {workers} workers, same decode and augment"
    rows = [
        {"benchmark": "ingest: decode+resize+augment, later epochs from memory (default)",
         "mlray_img_s": spread(steady["mlray_cached"]), "baseline": loader,
         "baseline_img_s": spread(steady["dataloader"]),
         "ratio": paired_ratio(steady["mlray_cached"], steady["dataloader"]),
         "first_epoch_ratio": paired_ratio(first["mlray_cached"], first["dataloader"])},
        {"benchmark": "ingest: decode+resize+augment, later epochs from local disk, cold (data.cache_mb=0)",
         "mlray_img_s": spread(steady["mlray_disk"]), "baseline": loader,
         "baseline_img_s": spread(steady["dataloader"]),
         "ratio": paired_ratio(steady["mlray_disk"], steady["dataloader"]),
         "first_epoch_ratio": paired_ratio(first["mlray_disk"], first["dataloader"])},
        {"benchmark": "ingest: decode+resize+augment, streamed every epoch (data.cache_mb=0, data.cache_disk_mb=0)",
         "mlray_img_s": spread(steady["mlray"]), "baseline": loader,
         "baseline_img_s": spread(steady["dataloader"]), "ratio": paired_ratio(steady["mlray"], steady["dataloader"]),
         "first_epoch_ratio": paired_ratio(first["mlray"], first["dataloader"])},
        {"benchmark": "ingest: decode+resize", "mlray_img_s": spread(steady["mlray_decode"]),
         "baseline": f"raw decode bound, {workers} processes, no framework", "baseline_img_s": spread(steady["raw"]),
         "ratio": paired_ratio(steady["mlray_decode"], steady["raw"])},
    ]
    record("ingest", rows)
    print(fmt_table(["benchmark", "mlray img/s", "baseline", "baseline img/s", "ratio (median, range)"],
                    [[r["benchmark"], fmt_spread(r["mlray_img_s"]), r["baseline"], fmt_spread(r["baseline_img_s"]),
                      fmt_spread(r["ratio"], 2)] for r in rows]))
    print("first epoch (start-up included), mlray / DataLoader: "
          f"{fmt_spread(rows[0]['first_epoch_ratio'], 2)} (default), {fmt_spread(rows[1]['first_epoch_ratio'], 2)} "
          f"(disk), {fmt_spread(rows[2]['first_epoch_ratio'], 2)} (streamed)")
    return rows


if __name__ == "__main__":
    main()

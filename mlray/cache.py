"""Epochs after the first replay the rows a worker already has in memory.

Decoding is most of what ingest costs (a 640x480 JPEG photo to 224² takes ~4 ms
of a core), and it is the same work every epoch: an image decodes and squashes
to ``image_size`` the same way each time, and augmentation comes after, per
step. So each training worker keeps the batches its first epoch streamed
(decoded images; encoded bytes with ``data.decode device``, which still decode
every epoch, on the device) and replays them in later epochs in a new random
order: no read, no fetch, no decode, and the cores go to the model.

What changes against streaming every epoch: a worker replays its own share of
the split, the one Ray Data dealt it in the first epoch (a random sample of the
split, as that epoch's order is), in a new order each epoch; streamed epochs
would deal the rows out afresh. With one worker it is a full shuffle of the split.

Memory: a worker holds its share, ``rows x image_size² x 3`` bytes of decoded
images, up to ``data.cache_mb`` (auto: a quarter of the memory available when
the worker starts, divided among the workers on its node). A worker whose share
outgrows that drops its copy as soon as it does; after the first epoch the
workers agree (one collective), and if any one dropped its copy all of them
keep streaming, since Ray Data's split of a dataset serves all workers or none.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

AUTO_MEMORY_SHARE = 0.25


def auto_limit_bytes(workers_on_node: int) -> int:
    """``data.cache_mb`` auto: this share of the node's available memory, per worker."""
    import psutil

    return int(psutil.virtual_memory().available * AUTO_MEMORY_SHARE / max(1, workers_on_node))


def limit_bytes(cache_mb: float | None, workers_on_node: int) -> int:
    return auto_limit_bytes(workers_on_node) if cache_mb is None else int(cache_mb * 2**20)


def _nbytes(batch: dict) -> int:
    n = 0
    for v in batch.values():
        if torch.is_tensor(v):
            n += v.element_size() * v.nelement()
        elif v.dtype == object:
            n += sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in v) + 8 * len(v)
        else:
            n += v.nbytes
    return n


class EpochCache:
    """One worker's copy of one split. ``record`` passes the first epoch's batches
    through and keeps them; once ``commit`` says every worker has its copy,
    ``replay`` yields them instead, ``batch_size`` rows at a time."""

    def __init__(self, limit: int, *, seed: int = 0, rank: int = 0):
        self.limit, self.seed, self.rank = limit, seed, rank
        self.chunks: list[dict] | None = [] if limit > 0 else None  # None: given up
        self.nbytes = 0
        self.ready = False
        self.offsets = np.zeros(1, dtype=np.int64)

    @property
    def complete(self) -> bool:
        """Holds every row of the epoch it recorded (false once over the limit)."""
        return self.chunks is not None

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    def record(self, batches: Iterable[dict]) -> Iterator[dict]:
        """Yield ``batches`` unchanged, keeping each (by reference: nothing downstream
        writes into a batch) while the copy stays within the limit."""
        for batch in batches:
            if self.chunks is not None and not self.ready:
                self.nbytes += _nbytes(batch)
                if self.nbytes > self.limit:
                    self.chunks = None
                else:
                    self.chunks.append(batch)
            yield batch

    def commit(self, everyone_complete: bool) -> bool:
        """After the recorded epoch: replay from now on if every worker holds its copy,
        else drop this one and stream. Returns whether replay is on."""
        if everyone_complete and self.chunks is not None:
            sizes = [len(next(iter(c.values()))) for c in self.chunks]
            self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
            self.ready = True
        else:
            self.chunks, self.ready = None, False
        return self.ready

    def replay(self, epoch: int | None, batch_size: int) -> Iterator[dict]:
        """The recorded rows, ``batch_size`` at a time (the last batch may be short):
        in a new random order for each ``epoch``, in recorded order for ``None``."""
        n = self.rows
        order = np.arange(n) if epoch is None else np.random.default_rng([self.seed, epoch, self.rank]).permutation(n)
        for i in range(0, n, batch_size):
            yield self._gather(order[i : i + batch_size])

    def _gather(self, idx: np.ndarray) -> dict:
        chunk_of = np.searchsorted(self.offsets, idx, side="right") - 1
        parts: dict[str, list] = {k: [] for k in self.chunks[0]}
        for c in np.unique(chunk_of):
            rows = idx[chunk_of == c] - self.offsets[c]
            for k, v in self.chunks[c].items():
                parts[k].append(v[torch.from_numpy(rows)] if torch.is_tensor(v) else v[rows])
        return {k: torch.cat(p) if torch.is_tensor(p[0]) else np.concatenate(p) for k, p in parts.items()}

"""Epochs after the first replay the rows a worker already has, in memory or on local disk.

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

Where the copy lives: a worker holds its share, ``rows x image_size² x 3`` bytes
of decoded images, in memory up to ``data.cache_mb`` (auto: a quarter of the
memory available when the worker starts, divided among the workers on its node;
in a container, what its cgroup's memory limit leaves if that is less, since a
Kubernetes pod is killed at its limit however much memory the node has);
the rows past that spill to one file on local disk, up to ``data.cache_disk_mb``
(auto: a quarter of the free space of ``data.cache_dir``, the system temp
directory by default, divided the same way). Only tensor columns spill (the
images and targets); ids and error strings stay in memory. Reading a 150 KB row
back from local disk costs far less than decoding its JPEG again (~4 ms of a
core). The file is unlinked as soon as it is created, so nothing is left behind
when the worker ends, however it ends. A worker whose share outgrows both
budgets drops its copy as soon as it does; after the first epoch the workers
agree (one collective), and if any one dropped its copy all of them keep
streaming, since Ray Data's split of a dataset serves all workers or none.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np
import torch

AUTO_MEMORY_SHARE = 0.25
# a limit at or above this is "no limit" (cgroup v1 writes 2**63 rounded down to a page)
_UNLIMITED = 2**60


def _read_int(path: str) -> int | None:
    """The number in a cgroup file; None when missing, unreadable or ``max``."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _inactive_file(directory: str) -> int:
    """Page cache the kernel drops before it kills (``inactive_file`` in ``memory.stat``:
    v1's hierarchical ``total_inactive_file`` first)."""
    found: dict[str, int] = {}
    try:
        with open(os.path.join(directory, "memory.stat")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key in ("total_inactive_file", "inactive_file") and value.strip().isdigit():
                    found[key] = int(value)
    except OSError:
        return 0
    return found.get("total_inactive_file", found.get("inactive_file", 0))


def _cgroup_dirs(root: str, proc_cgroup: str) -> list[str]:
    """This process's memory cgroup directory and its ancestors under ``root``: the
    v1 ``memory`` hierarchy when there is one, else the v2 unified one. Inside a
    container the cgroup is usually mounted as ``root`` itself (its path in
    ``/proc/self/cgroup`` is then ``/`` or does not exist under ``root``)."""
    base, path = root, "/"
    try:
        with open(proc_cgroup) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        lines = []
    v1 = [p for _, controllers, p in lines if "memory" in controllers.split(",")]
    if v1 or os.path.isdir(os.path.join(root, "memory")):
        base, path = os.path.join(root, "memory"), (v1[0] if v1 else "/")
    else:
        path = next((p for h, controllers, p in lines if h == "0" and controllers == ""), "/")
    parts = [p for p in path.split("/") if p]
    dirs = [os.path.join(base, *parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if os.path.isdir(d)]


def cgroup_memory_left(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes this process's cgroups let it take before the smallest of their memory
    limits: ``limit - (usage - inactive page cache)`` from cgroup v2's ``memory.max``
    and ``memory.current``, or v1's ``memory.limit_in_bytes`` and
    ``memory.usage_in_bytes``; None where no cgroup sets a limit (or there are no
    cgroup files, as on macOS)."""
    left = None
    for d in _cgroup_dirs(root, proc_cgroup):
        limit = _read_int(os.path.join(d, "memory.max"))
        usage = _read_int(os.path.join(d, "memory.current"))
        if limit is None and usage is None:
            limit = _read_int(os.path.join(d, "memory.limit_in_bytes"))
            usage = _read_int(os.path.join(d, "memory.usage_in_bytes"))
        if limit is None or limit >= _UNLIMITED:
            continue
        used = max(0, (usage or 0) - _inactive_file(d))
        here = max(0, limit - used)
        left = here if left is None else min(left, here)
    return left


def available_memory(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """Memory this process can still use: the node's available memory, or what its
    cgroup's limit leaves (``cgroup_memory_left``) when that is less."""
    import psutil

    node = int(psutil.virtual_memory().available)
    left = cgroup_memory_left(root, proc_cgroup)
    return node if left is None else min(node, left)


def auto_limit_bytes(workers_on_node: int) -> int:
    """``data.cache_mb`` auto: this share of the available memory (``available_memory``), per worker."""
    return int(available_memory() * AUTO_MEMORY_SHARE / max(1, workers_on_node))


def limit_bytes(cache_mb: float | None, workers_on_node: int) -> int:
    return auto_limit_bytes(workers_on_node) if cache_mb is None else int(cache_mb * 2**20)


def cache_directory(cache_dir: str | None) -> str:
    """``data.cache_dir``: a local directory for the rows that spill (null: the system temp directory)."""
    directory = os.path.expanduser(cache_dir) if cache_dir else tempfile.gettempdir()
    os.makedirs(directory, exist_ok=True)
    return directory


def disk_limit_bytes(cache_disk_mb: float | None, directory: str, workers_on_node: int) -> int:
    """``data.cache_disk_mb`` auto: this share of the directory's free space, per worker."""
    if cache_disk_mb is not None:
        return int(cache_disk_mb * 2**20)
    return int(shutil.disk_usage(directory).free * AUTO_MEMORY_SHARE / max(1, workers_on_node))


class _Spilled:
    """Where one tensor of a spilled batch lies in the cache's file, until ``commit`` maps it."""

    __slots__ = ("offset", "dtype", "shape")

    def __init__(self, offset: int, dtype: np.dtype, shape: tuple):
        self.offset, self.dtype, self.shape = offset, dtype, shape


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
    through and keeps them (in memory up to ``limit`` bytes, then in a file in
    ``directory`` up to ``disk_limit``); once ``commit`` says every worker has its
    copy, ``replay`` yields them instead, ``batch_size`` rows at a time."""

    def __init__(self, limit: int, *, disk_limit: int = 0, directory: str | None = None, seed: int = 0,
                 rank: int = 0):
        self.limit, self.disk_limit, self.directory = limit, disk_limit, directory
        self.seed, self.rank = seed, rank
        self.chunks: list[dict] | None = [] if limit > 0 or disk_limit > 0 else None  # None: given up
        self.nbytes = 0  # in memory
        self.disk_bytes = 0  # in the file
        self.file = None
        self.ready = False
        self.offsets = np.zeros(1, dtype=np.int64)

    @property
    def complete(self) -> bool:
        """Holds every row of the epoch it recorded (false once over its budgets)."""
        return self.chunks is not None

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    def record(self, batches: Iterable[dict]) -> Iterator[dict]:
        """Yield ``batches`` unchanged, keeping each (by reference: nothing downstream
        writes into a batch) while the copy stays within its budgets."""
        for batch in batches:
            if self.chunks is not None and not self.ready:
                self._keep(batch)
            yield batch

    def _keep(self, batch: dict) -> None:
        size = _nbytes(batch)
        if self.nbytes + size <= self.limit and self.disk_bytes == 0:  # in order: memory first, then disk
            self.nbytes += size
            self.chunks.append(batch)
            return
        tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        spill = sum(v.element_size() * v.nelement() for v in tensors.values())
        # Only batches that are mostly tensors spill: encoded bytes (data.decode device) do not.
        if self.directory is None or spill * 2 < size or self.disk_bytes + spill > self.disk_limit:
            self._give_up()
            return
        if self.file is None:
            self.file = tempfile.TemporaryFile(dir=self.directory, prefix="mlray-cache-")
        kept = dict(batch)
        for k, v in tensors.items():
            arr = np.ascontiguousarray(v.numpy())
            kept[k] = _Spilled(self.disk_bytes, arr.dtype, arr.shape)
            self.file.write(memoryview(arr.reshape(-1).view(np.uint8)))
            self.disk_bytes += arr.nbytes
        self.nbytes += size - spill
        self.chunks.append(kept)

    def _give_up(self) -> None:
        self.chunks, self.ready = None, False
        if self.file is not None:
            self.file.close()  # unlinked at creation: closing it frees the space
            self.file = None

    def commit(self, everyone_complete: bool) -> bool:
        """After the recorded epoch: replay from now on if every worker holds its copy,
        else drop this one and stream. Returns whether replay is on."""
        if everyone_complete and self.chunks is not None:
            if self.file is not None:
                self._map_file()
            sizes = [len(next(iter(c.values()))) for c in self.chunks]
            self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
            self.ready = True
        else:
            self._give_up()
        return self.ready

    def _map_file(self) -> None:
        """Turn each spilled tensor into a view of the file, mapped once (copy-on-write:
        the views are writable, as the stream's tensors are, and the file never changes)."""
        self.file.flush()
        mapped = np.memmap(self.file, mode="c", dtype=np.uint8, shape=(self.disk_bytes,)) if self.disk_bytes \
            else np.zeros(0, np.uint8)
        for chunk in self.chunks:
            for k, v in chunk.items():
                if isinstance(v, _Spilled):
                    n = int(np.prod(v.shape)) * v.dtype.itemsize
                    view = mapped[v.offset : v.offset + n].view(v.dtype).reshape(v.shape)
                    chunk[k] = torch.from_numpy(view)

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

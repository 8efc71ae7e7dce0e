"""The in-memory copy later epochs replay: every row once per epoch, a new order
each epoch, error rows kept, and streaming again whenever any worker's copy is incomplete."""

import os

import numpy as np
import torch

from mlray.data.cache import EpochCache


def _stream(n, batch, size=4):
    """Batches shaped like the training stream's: uint8 images, multi-hot targets, ids and errors."""
    for i in range(0, n, batch):
        ids = np.arange(i, min(n, i + batch))
        yield {
            "image": torch.from_numpy(np.stack([np.full((size, size, 3), k % 256, np.uint8) for k in ids])),
            "target": torch.from_numpy(np.stack([[k % 2, k % 3 == 0] for k in ids]).astype(np.uint8)),
            "image_id": np.array([f"img_{k}" for k in ids], dtype=object),
            "error": np.array(["truncated: cut" if k == 7 else "" for k in ids], dtype=object),
        }


def _rows(batches):
    out = {}
    for b in batches:
        for j, i in enumerate(b["image_id"]):
            out[i] = (int(b["image"][j, 0, 0, 0]), tuple(b["target"][j].tolist()), b["error"][j])
    return out


def test_replay_yields_every_row_once_with_its_own_data_in_a_new_order_each_epoch():
    cache = EpochCache(2**20, seed=3)
    streamed = list(cache.record(_stream(50, 16)))
    assert cache.commit(True) and cache.rows == 50
    orders = []
    for epoch in (1, 2):
        batches = list(cache.replay(epoch, 16))
        assert [len(b["image_id"]) for b in batches] == [16, 16, 16, 2]  # the stream's batch sizes
        assert _rows(batches) == _rows(streamed)  # each id with its own pixels, target and error
        orders.append([i for b in batches for i in b["image_id"]])
        assert len(set(orders[-1])) == 50
    assert orders[0] != orders[1] and orders[0] != [f"img_{k}" for k in range(50)]
    assert [i for b in cache.replay(None, 16) for i in b["image_id"]] == [f"img_{k}" for k in range(50)]


def test_a_copy_over_its_limit_is_dropped_and_everyone_streams():
    small = EpochCache(3 * 16 * 4 * 4 * 3, rank=1)  # room for the pixels of 2 batches of 3, not more
    assert len(list(small.record(_stream(50, 16)))) == 4  # the stream itself is untouched
    assert not small.complete and not small.commit(False)
    roomy = EpochCache(2**20)
    list(roomy.record(_stream(50, 16)))
    assert roomy.complete
    assert not roomy.commit(everyone_complete=False)  # another worker's copy was incomplete
    assert not roomy.ready and roomy.chunks is None  # and the memory is given back
    off = EpochCache(0)
    list(off.record(_stream(10, 4)))
    assert not off.complete


def test_rows_past_the_memory_budget_replay_from_local_disk_and_leave_no_file(tmp_path):
    """Memory first, then one unlinked file: the replay is the same rows as from memory."""
    probe = EpochCache(2**20)
    list(probe.record(list(_stream(50, 16))[:2]))
    first_two = probe.nbytes  # what the first two batches take in memory, as the cache counts it
    mixed = EpochCache(first_two, disk_limit=2**20, directory=str(tmp_path), seed=3)
    streamed = list(mixed.record(_stream(50, 16)))
    in_memory = EpochCache(2**20, seed=3)
    list(in_memory.record(_stream(50, 16)))
    assert mixed.complete and mixed.commit(True) and in_memory.commit(True)
    assert first_two < mixed.nbytes < in_memory.nbytes  # ids and errors of the spilled rows stay in memory
    assert mixed.disk_bytes == (16 + 2) * (4 * 4 * 3 + 2)  # the pixels and targets of the last two batches
    assert os.listdir(tmp_path) == []  # the file has no name: nothing is left behind, however the worker ends
    for epoch in (1, 2):
        batches = list(mixed.replay(epoch, 16))
        assert _rows(batches) == _rows(streamed)
        assert [list(b["image_id"]) for b in batches] == [list(b["image_id"]) for b in in_memory.replay(epoch, 16)]
    batch = next(mixed.replay(1, 16))
    batch["image"][0] = 0  # writable, as the stream's tensors are, without touching the copy
    assert _rows(mixed.replay(1, 16)) == _rows(streamed)
    only_disk = EpochCache(0, disk_limit=2**20, directory=str(tmp_path))
    list(only_disk.record(_stream(50, 16)))
    assert only_disk.commit(True) and only_disk.disk_bytes == 50 * (4 * 4 * 3 + 2)
    assert _rows(only_disk.replay(None, 16)) == _rows(streamed)


def test_a_copy_over_both_budgets_or_of_encoded_bytes_gives_up(tmp_path):
    full = EpochCache(0, disk_limit=3 * 16 * 4 * 4 * 3, directory=str(tmp_path))
    assert len(list(full.record(_stream(50, 16)))) == 4
    assert not full.complete and full.file is None and not full.commit(True)
    encoded = EpochCache(0, disk_limit=2**20, directory=str(tmp_path))
    batches = [{"image": np.array([b"\xff\xd8" + bytes(3000)] * 8, dtype=object),
                "target": torch.zeros(8, 2, dtype=torch.uint8), "image_id": np.array(["a"] * 8, dtype=object)}]
    list(encoded.record(batches))
    assert not encoded.complete  # bytes stay in memory or nowhere: there was no memory for them


def _files(directory, **values):
    os.makedirs(directory, exist_ok=True)
    for name, text in values.items():
        with open(os.path.join(directory, name.replace("__", ".")), "w") as f:
            f.write(text)


def test_memory_left_is_read_from_the_cgroup_limits_v2_and_v1(tmp_path):
    """In a container the replay cache sizes itself from what the cgroup's limit
    leaves (a pod is killed at its limit, whatever the node has free); reclaimable
    page cache does not count as used."""
    from mlray.data.cache import available_memory, cgroup_memory_left

    mb = 2**20
    # cgroup v2, mounted as the container's own cgroup (its path is "/")
    v2 = tmp_path / "v2"
    _files(v2, memory__max=f"{1000 * mb}\n", memory__current=f"{700 * mb}\n",
           memory__stat=f"anon {500 * mb}\nfile {200 * mb}\ninactive_file {150 * mb}\nactive_file {50 * mb}\n")
    _files(tmp_path, v2_self="0::/\n")
    assert cgroup_memory_left(str(v2), str(tmp_path / "v2_self")) == (1000 - 700 + 150) * mb
    assert available_memory(str(v2), str(tmp_path / "v2_self")) <= 450 * mb
    # no limit ("max"), or no cgroup files at all: nothing to respect
    _files(v2, memory__max="max\n")
    assert cgroup_memory_left(str(v2), str(tmp_path / "v2_self")) is None
    assert cgroup_memory_left(str(tmp_path / "nowhere"), str(tmp_path / "no_proc_file")) is None
    # cgroup v2, not namespaced: the process's own cgroup and its parents, the smallest limit wins
    _files(v2 / "kubepods" / "pod1", memory__max=f"{300 * mb}\n", memory__current=f"{100 * mb}\n")
    _files(v2 / "kubepods", memory__max=f"{250 * mb}\n", memory__current=f"{200 * mb}\n")
    _files(tmp_path, v2_pod="0::/kubepods/pod1\n")
    assert cgroup_memory_left(str(v2), str(tmp_path / "v2_pod")) == 50 * mb
    # cgroup v1: the memory hierarchy; 2**63 rounded down to a page means no limit
    v1 = tmp_path / "v1"
    _files(v1 / "memory", memory__limit_in_bytes="9223372036854771712\n", memory__usage_in_bytes=f"{900 * mb}\n")
    _files(v1 / "memory" / "docker" / "abc", memory__limit_in_bytes=f"{2000 * mb}\n",
           memory__usage_in_bytes=f"{1500 * mb}\n",
           memory__stat=f"cache {600 * mb}\ninactive_file {1 * mb}\ntotal_inactive_file {400 * mb}\n")
    _files(tmp_path, v1_self="12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert cgroup_memory_left(str(v1), str(tmp_path / "v1_self")) == (2000 - 1500 + 400) * mb
    # a container whose cgroup is mounted at the root of the hierarchy: its path does not exist there
    _files(v1 / "memory", memory__limit_in_bytes=f"{800 * mb}\n", memory__usage_in_bytes=f"{600 * mb}\n")
    _files(tmp_path, v1_other="4:memory:/docker/elsewhere\n")
    assert cgroup_memory_left(str(v1), str(tmp_path / "v1_other")) == 200 * mb

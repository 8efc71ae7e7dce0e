"""Progress a person can watch while a Ray job runs: rows done / total, rate, ETA.

The workers that finish rows add to a tiny counter actor (fire and forget, one
call per batch); a thread on the driver reads it once a second and draws a bar
on a terminal, or writes one line every ``log_every_s`` seconds into logs.
"""

from __future__ import annotations

import sys
import threading
import time


class _Counter:
    def __init__(self):
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n

    def get(self) -> int:
        return self.done


def counter():
    """A counter actor; workers call ``handle.add.remote(n)``."""
    import ray

    return ray.remote(num_cpus=0)(_Counter).remote()


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def line(desc: str, done: int, total: int, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    pct = 100.0 * done / total if total else 100.0
    return f"{desc}: {done:,}/{total:,} rows ({pct:.0f}%), {rate:.1f} images/s, ETA {_eta(eta)}"


class Watcher:
    """``with Watcher(handle, total, "tag"):`` shows progress until the block ends."""

    def __init__(self, handle, total: int, desc: str, *, log_every_s: float = 30.0, stream=None):
        self.handle, self.total, self.desc = handle, total, desc
        self.log_every_s = log_every_s
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlray-progress", daemon=True)
        self.done = 0

    def _poll(self) -> int:
        import ray

        try:
            return int(ray.get(self.handle.get.remote(), timeout=5))
        except Exception:  # noqa: BLE001 - progress must never break the job
            return self.done

    def _run(self) -> None:
        t0 = time.time()
        tty = self.stream.isatty()
        bar = None
        if tty:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total, desc=self.desc, unit="img", file=self.stream, dynamic_ncols=True)
        last_log = t0
        while not self._stop.wait(1.0):
            self.done = self._poll()
            if bar is not None:
                bar.update(self.done - bar.n)
            elif time.time() - last_log >= self.log_every_s:
                print(line(self.desc, self.done, self.total, time.time() - t0), file=self.stream, flush=True)
                last_log = time.time()
        self.done = self._poll()
        if bar is not None:
            bar.update(self.done - bar.n)
            bar.close()

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

"""One writer at a time on a tagging OUT: a lease object beside the parts.

``OUT/_lease.json`` holds the owner (a random token), host, pid, command and an
expiry. It is created with a conditional write (S3 ``If-None-Match: *``, a local
``O_EXCL`` create), so of two jobs started together exactly one gets it; the
other refuses at once, or waits with ``--wait``. The holder renews it from a
background thread, a third of a ttl after each expiry it stamped (S3
``If-Match`` on its own ETag, so a renewal never overwrites a lease that another
job took over); a job starts only with two thirds of the ttl left, renewing
first when the write that took the lease stalled. A lease whose holder was killed
stops being renewed and is taken over once it expires (at once when the holder
ran on this host and its process is gone), with the same
conditional write on the expired version: of two jobs racing for it, one wins.

A write whose answer was lost (the connection dropped after the store took it)
is retried like every storage call, and the retry's condition then fails on our
own first write: after a failed condition the lease is read back, and a lease
that holds exactly the document we wrote is ours.

S3-compatible stores without conditional writes answer them like plain ones;
there the lease still serialises jobs that do not start within the same
second, and the next run's duplicate repair mops up after those that did.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from mlray.io import storage

LEASE_FILE = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another job holds the lease; the message names it."""


@dataclass
class LeaseInfo:
    owner: str
    host: str
    pid: int
    command: str
    acquired: float
    expires: float

    def dead(self) -> bool:
        """The holder ran on this host and its process is gone (killed): no need
        to wait for the expiry. Holders on other hosts are judged by expiry alone."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def describe(self) -> str:
        left = self.expires - time.time()
        when = f"expires in {left:.0f} s" if left > 0 else f"expired {-left:.0f} s ago"
        return f"pid {self.pid} on {self.host}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.acquired))}, {when}"


class _LocalBackend:
    """A local directory: O_EXCL create, and read-check-replace under flock."""

    def __init__(self, uri: str):
        self.path = storage.resolve(uri)[1]
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.lock_path = self.path + ".lock"

    def read(self) -> tuple[dict | None, str | None]:
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None, None
        return (json.loads(text) if text else None), text

    def create(self, doc: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc))
        return True

    def replace(self, doc: dict, version: str | None) -> bool:
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _, current = self.read()
            if current != version:
                return False
            tmp = f"{self.path}.{uuid.uuid4().hex}"
            with open(tmp, "w") as f:
                f.write(json.dumps(doc))
            os.replace(tmp, self.path)
            return True

    def delete(self, version: str | None) -> None:
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _, current = self.read()
            if current == version:
                os.remove(self.path)


class _S3Backend:
    """S3: conditional PUTs (If-None-Match / If-Match) through s3fs."""

    def __init__(self, uri: str):
        import s3fs

        self.bucket, _, self.key = uri.split("://", 1)[1].partition("/")
        endpoint = storage.s3_endpoint()
        self.fs = s3fs.S3FileSystem(
            endpoint_url=endpoint,
            client_kwargs={"region_name": storage.bucket_region(self.bucket, endpoint)},
        )

    def _call(self, op: str, **kw):
        """One S3 call; botocore's connection errors (not OSErrors) become OSErrors,
        so a store that is down is retried and reported like every other storage error."""
        try:
            return self.fs.call_s3(op, **kw)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore / aiohttp connection errors
            raise ConnectionError(f"s3://{self.bucket}/{self.key}: {e}") from e

    def read(self) -> tuple[dict | None, str | None]:
        try:
            r = storage.retrying(lambda: self._call("get_object", Bucket=self.bucket, Key=self.key),
                                 f"s3://{self.bucket}/{self.key}")
        except storage.StorageError as e:
            if isinstance(e.__cause__, FileNotFoundError) or "no such file" in str(e):
                return None, None
            raise
        body = r["Body"]
        text = _read_body(self.fs, body)
        return (json.loads(text) if text else None), r["ETag"]

    def _put(self, doc: dict, **cond) -> bool:
        """The conditional write, with transient errors retried; False when its condition failed."""
        def put() -> bool:
            try:
                self._call("put_object", Bucket=self.bucket, Key=self.key, Body=json.dumps(doc).encode(), **cond)
            except OSError as e:
                if "pre-condition" in str(e) or "PreconditionFailed" in str(e) or "ConditionalRequestConflict" in str(e):
                    return False
                raise
            return True

        return storage.retrying(put, f"s3://{self.bucket}/{self.key}")

    def create(self, doc: dict) -> bool:
        return self._put(doc, IfNoneMatch="*")

    def replace(self, doc: dict, version: str | None) -> bool:
        return self._put(doc, IfMatch=version) if version else self.create(doc)

    def delete(self, version: str | None) -> None:
        _, current = self.read()
        if current == version:
            self._call("delete_object", Bucket=self.bucket, Key=self.key)


def _read_body(fs, body) -> str:
    from fsspec.asyn import sync

    async def read():
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, read).decode()


def _write_error(uri: str, what: str, e: OSError) -> storage.StorageError:
    """The error for a lease write that failed for good: the store down, or OUT not writable."""
    if storage.is_transient(e):
        return storage.StorageError(f"{uri}: cannot {what} the lease, the store did not answer ({e}); "
                                    "run again when it is back", transient=True)
    return storage.StorageError(f"{uri}: cannot {what} the lease ({e}); is --out writable?")


def _backend(uri: str):
    return _S3Backend(uri) if uri.startswith(("s3://", "s3a://")) else _LocalBackend(uri)


class Lease:
    """``with Lease(out, ttl=120, wait=0):`` holds OUT for this job or raises ``LeaseHeld``."""

    def __init__(self, out: str, *, ttl: float = 120.0, wait: float = 0.0, command: str | None = None):
        self.uri = storage.join(out, LEASE_FILE)
        self.ttl = ttl
        self.wait = wait
        self.command = command or " ".join(sys.argv)
        self.token = uuid.uuid4().hex
        self.version: str | None = None
        self.lost: str | None = None
        self._acquired = self._stamped = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backend = _backend(self.uri)

    def _doc(self, acquired: float | None = None) -> dict:
        now = time.time()
        return {
            "owner": self.token, "host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
            "acquired": acquired or now, "expires": now + self.ttl,
        }

    def _written(self, doc: dict, version: str | None = None) -> None:
        """Our ``doc`` is the lease now: its version and when its expiry was stamped."""
        self.version = version or self._backend.read()[1]
        self._acquired, self._stamped = doc["acquired"], doc["expires"] - self.ttl

    def _write(self, doc: dict, write) -> bool:
        """``write(doc)`` (a conditional write); True when ``doc`` is the lease now.
        A failed condition is read back: a retry whose first try reached the store
        (its answer lost on the way) fails on our own write, which then is the lease."""
        if write(doc):
            self._written(doc)
            return True
        current, version = self._backend.read()
        if current == json.loads(json.dumps(doc)):
            self._written(doc, version)
            return True
        return False

    def _try_acquire(self) -> LeaseInfo | None:
        """None when acquired, else the holder's lease."""
        doc = self._doc()
        if self._write(doc, self._backend.create):
            return None
        current, version = self._backend.read()
        if current is None:  # released between our create and read: try again next round
            return LeaseInfo(owner="", host="?", pid=0, command="", acquired=time.time(), expires=time.time())
        held = LeaseInfo(**{k: current[k] for k in LeaseInfo.__dataclass_fields__})
        if (held.expires < time.time() or held.dead()) and self._write(doc, lambda d: self._backend.replace(d, version)):
            why = "expired" if held.expires < time.time() else "dead (its process is gone)"
            print(f"took over the lease on {self.uri} of a job that is {why} ({held.describe()})", file=sys.stderr)
            return None
        return held

    def _renew(self) -> bool:
        """Extend our lease by a ttl from now; False (and ``lost`` set) when another job holds it."""
        current, version = self._backend.read()
        doc = self._doc(self._acquired)
        if current and current.get("owner") == self.token and self._write(doc, lambda d: self._backend.replace(d, version)):
            return True
        self.lost = f"another job took over {self.uri}"
        return False

    def acquire(self) -> "Lease":
        """Hold the lease (waiting up to ``wait`` seconds for its holder), with at
        least two thirds of its ttl left when this returns, then renew it in the
        background. The expiry is stamped before the write, so a write that
        stalled (a store's first write can take seconds) is followed by a renewal."""
        deadline = time.time() + self.wait
        announced = False
        while True:
            try:
                held = self._try_acquire()
            except OSError as e:
                raise _write_error(self.uri, "write", e) from e
            if held is None:
                break
            if time.time() >= deadline:
                raise LeaseHeld(
                    f"{storage.parent(self.uri)} is being written by another tagging job ({held.describe()}; "
                    f"command: {held.command or '?'}). Run again when it ends, pass --wait to wait for it, "
                    f"or, if that job is dead, wait until its lease expires"
                )
            if not announced:
                print(f"waiting for the tagging job that holds {self.uri} ({held.describe()})", file=sys.stderr)
                announced = True
            # look again when the holder's lease would expire (every 5 s at most)
            pause = min(5.0, max(0.5, held.expires - time.time() + 0.1))
            time.sleep(max(0.05, min(pause, deadline - time.time())))
        self._fresh()
        self._thread = threading.Thread(target=self._renew_loop, name="mlray-lease", daemon=True)
        self._thread.start()
        return self

    def _fresh(self) -> None:
        """Renew until two thirds of the ttl are left (a few tries), or say why not."""
        for _ in range(3):
            if time.time() - self._stamped <= self.ttl / 3:
                return
            try:
                renewed = self._renew()
            except OSError as e:
                raise _write_error(self.uri, "renew", e) from e
            if not renewed:
                raise LeaseHeld(f"{self.lost}: writing the lease took longer than its ttl; "
                                f"pass a longer --lease-ttl (now {self.ttl:g} s)")
        if time.time() - self._stamped > self.ttl / 3:
            raise storage.StorageError(
                f"{self.uri}: each write of the lease took longer than a third of its ttl ({self.ttl:g} s), "
                "so renewals could not keep it; pass a longer --lease-ttl")

    def _renew_loop(self) -> None:
        """Renew a third of a ttl after each stamp; after a failed try, a third of a ttl later."""
        due = self._stamped + self.ttl / 3
        while not self._stop.wait(max(0.0, due - time.time())):
            try:
                if not self._renew():
                    return
                due = self._stamped + self.ttl / 3
            except Exception as e:  # noqa: BLE001 - a blink of the store: try again next round, the ttl allows two misses
                print(f"could not renew the lease {self.uri}: {e}", file=sys.stderr)
                due = time.time() + self.ttl / 3

    def check(self) -> None:
        """Raise if the lease was lost (another job took it over after we failed to renew)."""
        if self.lost:
            raise LeaseHeld(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        if not self.lost:
            try:
                current, version = self._backend.read()
                if current and current.get("owner") == self.token:
                    self._backend.delete(version)
            except Exception as e:  # noqa: BLE001 - releasing is best effort: the lease expires by itself
                print(f"could not release the lease {self.uri} (it expires by itself): {e}", file=sys.stderr)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

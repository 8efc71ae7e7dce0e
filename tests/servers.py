"""Real servers for tests, each started as a child in its own process group on
loopback and stopped by signalling that group (never by name: other Ray heads or
S3 servers on the machine stay untouched)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: str, ok=(200,)) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log: {log}\n{open(log).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s; log: {log}")


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class S3Server:
    """SeaweedFS ``weed mini`` with fixed credentials and its own data dir."""

    access_key = "mlray-test"
    secret_key = "mlray-test-secret"

    def __init__(self, workdir: str, secret_key: str | None = None):
        self.workdir = workdir
        if secret_key:
            self.secret_key = secret_key
        os.makedirs(workdir, exist_ok=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = os.path.join(workdir, "weed.log")
        ports = {
            "s3.port": self.port, "master.port": free_port(), "volume.port": free_port(),
            "filer.port": free_port(), "master.port.grpc": free_port(), "volume.port.grpc": free_port(),
            "filer.port.grpc": free_port(), "s3.port.grpc": free_port(),
        }
        cmd = [
            os.path.join(BIN, "weed"), f"-logdir={workdir}", "mini", f"-dir={workdir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            *[f"-{k}={v}" for k, v in ports.items()],
        ]
        self.cmd = cmd
        self.start()

    def start(self) -> None:
        """Start the server (again, after ``kill``: same ports, same data)."""
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.workdir, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_http(self.endpoint + "/", 60, self.proc, self.log, ok=(200, 403))

    def kill(self) -> None:
        """An outage: the whole server gone at once, as when its machine drops off."""
        stop_group(self.proc, signal.SIGKILL, timeout=5)

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def create_bucket(self, name: str) -> str:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key=self.access_key, secret_key=self.secret_key, endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http", region="us-east-1", allow_bucket_creation=True,
        )
        fs.create_dir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        # Open client keep-alive connections hold a graceful stop for ~30 s; data
        # integrity at the end of a test session doesn't matter.
        stop_group(self.proc, signal.SIGTERM, timeout=3)


class _Proxy:
    """A TCP proxy in front of a server on loopback. It passes bytes both ways and
    hands each chunk of a client's bytes that holds requests starting with
    ``match`` to ``_on_match(n, client)``, which may stall it or return True to
    drop the connection, and each chunk of a server's answer to
    ``_drop_answer(client, data)``, which may return True to drop it and the
    connection; while ``_down()``, every connection is reset."""

    def __init__(self, target_port: int, match: bytes):
        import threading

        self.target_port, self.match = target_port, match
        self.requests = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _down(self) -> bool:
        return False

    def _on_match(self, n: int, client: socket.socket) -> bool:
        raise NotImplementedError

    def _drop_answer(self, client: socket.socket, data: bytes) -> bool:
        return False

    @staticmethod
    def _reset(s: socket.socket) -> None:
        import struct

        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        except OSError:
            pass

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down():
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                self._reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        tail = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if requests:
                    seen = tail + data
                    n = seen.count(self.match) - tail.count(self.match)
                    tail = seen[-len(self.match):]
                    if n and self._on_match(n, src):
                        return
                elif self._drop_answer(dst, data):
                    return
                if self._down():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._reset(src)
            self._reset(dst)
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            victims = list(self._open)
        for s in victims:
            self._reset(s)


class CuttingProxy(_Proxy):
    """Fails like a network does: after ``after`` requests matching ``match``
    (e.g. ``b"GET /bucket/images/"``: object fetches, not listings) it cuts every
    open connection with a TCP reset and resets every new one for ``down_s``
    seconds, then passes traffic again. The outage lands at the same phase of a
    job every time (restarting the server itself lands anywhere: the listing, the
    fetches or the final write)."""

    def __init__(self, target_port: int, match: bytes, after: int, down_s: float):
        self.after, self.down_s = after, down_s
        self.cut_at: float | None = None
        super().__init__(target_port, match)

    def _down(self) -> bool:
        return self.cut_at is not None and time.time() < self.cut_at + self.down_s

    def _on_match(self, n: int, client: socket.socket) -> bool:
        """Count ``n`` matching requests; True when this cut the connections."""
        with self._lock:
            self.requests += n
            if self.cut_at is not None or self.requests < self.after:
                return False
            self.cut_at = time.time()
            victims = list(self._open)
        for s in victims:
            self._reset(s)
        return True


class StallingProxy(_Proxy):
    """Holds the first ``times`` requests matching ``match`` for ``stall_s``
    seconds before passing them on: a store whose write hangs now and then."""

    def __init__(self, target_port: int, match: bytes, stall_s: float, times: int = 1):
        self.stall_s, self.times = stall_s, times
        super().__init__(target_port, match)

    def _on_match(self, n: int, client: socket.socket) -> bool:
        with self._lock:
            self.requests += n
            stall = self.requests - n < self.times
        if stall:
            time.sleep(self.stall_s)
        return False


class AnswerLosingProxy(_Proxy):
    """Passes the next ``times`` requests matching ``match`` on to the server,
    then resets the connection instead of passing back the server's answer: the
    request took effect, and the client cannot know it (it retries, and those
    retries go through). ``lose_next()`` does it to the next matching request again."""

    def __init__(self, target_port: int, match: bytes, times: int = 1):
        self.pending = times
        self.lost = 0
        self._doomed: set[socket.socket] = set()
        super().__init__(target_port, match)

    def lose_next(self) -> None:
        with self._lock:
            self.pending += 1

    def _on_match(self, n: int, client: socket.socket) -> bool:
        with self._lock:
            self.requests += n
            if self.pending > 0:
                self.pending -= 1
                self._doomed.add(client)
        return False

    def _drop_answer(self, client: socket.socket, data: bytes) -> bool:
        with self._lock:
            if client not in self._doomed or data.startswith(b"HTTP/1.1 100"):  # "100 Continue": not the answer yet
                return False
            self._doomed.discard(client)
            self.lost += 1
        try:  # wakes the thread reading the client's side, so the client sees the drop now, not at its read timeout
            client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

"""Storage against a real S3 server: transient errors are told from permanent
ones, the region is never a silent guess, and the lease on a tagging OUT lets
one writer in at a time."""

from __future__ import annotations

import os
import threading
import time

import pytest

from mlray.io import storage
from mlray.io.lease import Lease, LeaseHeld


def test_an_unreachable_server_is_transient_and_a_missing_object_is_not(bucket, tmp_path):
    from servers import S3Server

    storage.write_bytes(f"{bucket}/here", b"x")
    with pytest.raises(storage.StorageError) as missing:
        storage.read_bytes(f"{bucket}/not-here")
    assert not missing.value.transient and "not-here" in str(missing.value)
    assert not storage.is_transient(PermissionError("denied"))
    # a server that goes down: retried, then raised as transient, naming the URI
    import pyarrow.fs as pafs

    from servers import S3Server

    server = S3Server(str(tmp_path / "blink"))
    try:
        fs = pafs.S3FileSystem(access_key=server.access_key, secret_key=server.secret_key, region="us-east-1",
                               endpoint_override=f"127.0.0.1:{server.port}", scheme="http", allow_bucket_creation=True)
        fs.create_dir("blink")
        with fs.open_output_stream("blink/k") as f:
            f.write(b"ok")
        server.kill()
        t0 = time.time()
        with pytest.raises(storage.StorageError) as gone:
            storage.retrying(lambda: fs.open_input_stream("blink/k").read(), "s3://blink/k", attempts=3)
        assert gone.value.transient and "s3://blink/k" in str(gone.value) and "3 attempts" in str(gone.value)
        assert time.time() - t0 >= 0.25 + 0.5  # it backed off between the attempts
        # back within the retry budget: the same read succeeds
        threading.Timer(1.0, server.start).start()
        assert storage.retrying(lambda: fs.open_input_stream("blink/k").read(), "s3://blink/k") == b"ok"
    finally:
        time.sleep(0.5)
        server.stop()


def test_region_comes_from_env_then_aws_config_never_a_silent_guess(tmp_path, monkeypatch):
    for k in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    config = tmp_path / "config"
    config.write_text("[default]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    storage.bucket_region.cache_clear()
    assert storage.bucket_region("b1", None) == "eu-west-3"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    storage.bucket_region.cache_clear()
    assert storage.bucket_region("b1", None) == "ap-south-1"
    # a custom endpoint without a configured region: S3-compatible servers ignore it
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    storage.bucket_region.cache_clear()
    assert storage.bucket_region("b1", "http://127.0.0.1:9000") == "us-east-1"
    storage.bucket_region.cache_clear()
    # secrets never go to Ray in the clear
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hush")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "hush-token")
    assert "hush" not in str(storage.s3_env())


@pytest.mark.parametrize("where", ["s3", "local"])
def test_lease_one_holder_renewed_then_taken_over_when_expired(where, bucket, tmp_path):
    out = f"{bucket}/out" if where == "s3" else str(tmp_path / "out")
    first = Lease(out, ttl=3).acquire()
    with pytest.raises(LeaseHeld, match="another tagging job"):
        Lease(out, ttl=3).acquire()
    time.sleep(3.5)  # longer than the ttl: renewals keep it held
    with pytest.raises(LeaseHeld):
        Lease(out, ttl=3).acquire()
    # the holder stops renewing without releasing (its host lost power): after
    # the expiry a waiting job takes over, and the old holder learns it lost it
    first._stop.set()
    first._thread.join()
    t0 = time.time()
    second = Lease(out, ttl=3, wait=20).acquire()
    assert 0.5 < time.time() - t0 < 15
    second.release()
    third = Lease(out, ttl=3).acquire()  # released: free at once
    third.release()
    assert not storage.exists(storage.join(out, "_lease.json"))


def test_a_lease_whose_first_write_stalled_is_still_held_when_acquire_returns(s3_server, bucket, monkeypatch):
    """A store's write can hang for seconds (a fresh bucket, a loaded host). The
    lease's expiry is stamped before its write, so acquire renews it before
    returning: the job then holds it with most of its ttl left, and a second job
    is refused rather than taking over a lease its holder just got."""
    import json

    from servers import StallingProxy

    name = bucket.split("://", 1)[1]
    proxy = StallingProxy(s3_server.port, match=f"PUT /{name}/out/_lease.json".encode(), stall_s=2.5)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        t0 = time.time()
        first = Lease(f"{bucket}/out", ttl=3).acquire()
        assert time.time() - t0 > 2.5  # the create stalled
        doc = json.loads(storage.read_text(f"{bucket}/out/_lease.json"))
        assert doc["expires"] - time.time() > 1.8 and doc["owner"] == first.token
        with pytest.raises(LeaseHeld, match="another tagging job"):
            Lease(f"{bucket}/out", ttl=3).acquire()
        first.release()
        assert first.lost is None and not storage.exists(f"{bucket}/out/_lease.json")
    finally:
        proxy.close()


def test_a_lease_write_whose_answer_was_lost_is_recognised_as_ours(s3_server, bucket, monkeypatch):
    """The store takes the lease's write, and the connection drops before its
    answer comes back: the client retries, and the retried conditional write
    fails on the job's own first write. The job holds the lease (it does not
    refuse itself as "another tagging job"), and a renewal whose answer is lost
    keeps it too (the job does not think it was taken over)."""
    import json

    from servers import AnswerLosingProxy

    name = bucket.split("://", 1)[1]
    proxy = AnswerLosingProxy(s3_server.port, match=f"PUT /{name}/out/_lease.json".encode())
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        first = Lease(f"{bucket}/out", ttl=4).acquire()  # the create's answer lost
        assert proxy.lost == 1
        doc = json.loads(storage.read_text(f"{bucket}/out/_lease.json"))
        assert doc["owner"] == first.token and doc["pid"] == os.getpid()
        first._stop.set()  # renew by hand, not beside the background renewals
        first._thread.join()
        proxy.lose_next()
        assert first._renew() and proxy.lost == 2 and first.lost is None  # a renewal's answer lost
        renewed = json.loads(storage.read_text(f"{bucket}/out/_lease.json"))
        assert renewed["owner"] == first.token and renewed["expires"] > doc["expires"]
        with pytest.raises(LeaseHeld, match="another tagging job"):
            Lease(f"{bucket}/out", ttl=4).acquire()
        first.check()
        first.release()
        assert first.lost is None and not storage.exists(f"{bucket}/out/_lease.json")
    finally:
        proxy.close()


def test_lease_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    doc = {"owner": "x", "host": socket.gethostname(), "pid": pid, "command": "mlray tag ...",
           "acquired": time.time(), "expires": time.time() + 600}
    (out / "_lease.json").write_text(json.dumps(doc))
    if os.path.exists(f"/proc/{pid}"):
        pytest.skip("the pid was reused")
    Lease(str(out), ttl=3).acquire().release()


def test_fetch_errors_become_retryable_or_missing_rows(tmp_path, monkeypatch):
    """Decode tasks mark a row ``retryable:`` when the store could not be reached
    (tagging leaves it for the next run) and ``missing:`` when the object is absent."""
    import pyarrow as pa

    from servers import S3Server

    from mlray.data.pipeline import decode_rows
    from mlray.io.tagged import RETRYABLE

    server = S3Server(str(tmp_path / "gone"))
    try:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        server.create_bucket("fetch")
        storage.write_bytes("s3://fetch/there.jpg", b"not really a jpeg")
        monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 2)
        batch = pa.table({"image_id": ["a", "b"], "uri": ["s3://fetch/there.jpg", "s3://fetch/absent.jpg"]})
        up = decode_rows(batch, size=32)
        assert up["error"][0].startswith("not_an_image") and up["error"][1].startswith("missing:")
        server.kill()
        down = decode_rows(batch, size=32)
        assert all(e.startswith(RETRYABLE + ":") for e in down["error"]), down["error"]
        assert down["image"].shape == (2, 32, 32, 3)
    finally:
        server.stop()

"""The lease on a tagging OUT lets one writer in at a time, locally and on a real
S3 server, through stalled writes, lost answers and dead holders."""

from __future__ import annotations

import os
import time

import pytest

from mlray.io import storage
from mlray.io.lease import Lease, LeaseHeld


@pytest.mark.slow
@pytest.mark.parametrize("where", ["s3", "local"])
def test_lease_one_holder_renewed_then_taken_over_when_expired(where, bucket, tmp_path):
    out = f"{bucket}/out" if where == "s3" else str(tmp_path / "out")
    first = Lease(out, ttl=3).acquire()
    with pytest.raises(LeaseHeld, match="another tagging job"):
        Lease(out, ttl=3).acquire()
    time.sleep(3.5)  # longer than the ttl: renewals keep it held
    with pytest.raises(LeaseHeld):
        Lease(out, ttl=3).acquire()
    # the holder stops renewing without releasing (its host lost power; no public
    # call does that, it is the failure under test): after the expiry a waiting
    # job takes over, and the old holder learns it lost it
    first._stop.set()
    first._thread.join()
    t0 = time.time()
    second = Lease(out, ttl=3, wait=20).acquire()
    assert 0.5 < time.time() - t0 < 15
    second.release()
    third = Lease(out, ttl=3).acquire()  # released: free at once
    third.release()
    assert not storage.exists(storage.join(out, "_lease.json"))


@pytest.mark.slow
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


@pytest.mark.slow
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
        first._stop.set()  # renew by hand, not beside the background renewals: the renewal is the unit here
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

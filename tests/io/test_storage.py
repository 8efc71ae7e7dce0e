"""Storage against a real S3 server: transient errors are told from permanent
ones, and the region is never a silent guess."""

from __future__ import annotations

import threading
import time

import pytest

from mlray.io import storage


@pytest.mark.slow
def test_an_unreachable_server_is_transient_and_a_missing_object_is_not(bucket, tmp_path):
    from servers import S3Server

    storage.write_bytes(f"{bucket}/here", b"x")
    with pytest.raises(storage.StorageError) as missing:
        storage.read_bytes(f"{bucket}/not-here")
    assert not missing.value.transient and "not-here" in str(missing.value)
    assert not storage.is_transient(PermissionError("denied"))
    # a server that goes down: retried, then raised as transient, naming the URI
    import pyarrow.fs as pafs

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

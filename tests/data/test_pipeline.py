"""The decode tasks of the image stream against a real S3 server that goes away."""

from __future__ import annotations

import pytest

from mlray.io import storage


@pytest.mark.slow
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

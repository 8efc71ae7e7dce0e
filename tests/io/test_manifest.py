"""The manifest contract: what is refused on read and write, and how packed row groups are sized."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlray.io.manifest import ManifestError, read_manifest, write_manifest


def test_read_back_validates_the_contract(tmp_path):
    import pyarrow as pa

    from mlray.io.manifest import build_table, schema_with_vocab

    t = build_table(["a", "b"], ["/x/a.jpg", "/x/b.jpg"], [["cat"], ["dog"]])
    with pytest.raises(ManifestError, match="labels not in the vocabulary: \\['dog'\\]"):
        write_manifest(t, ["cat"], str(tmp_path / "m"))
    dup = build_table(["a", "a"], ["/x/a.jpg", "/x/b.jpg"], [["cat"], []])
    path = tmp_path / "dup.parquet"
    pq.write_table(dup.replace_schema_metadata(schema_with_vocab(dup.schema, ["cat"]).metadata), path)
    with pytest.raises(ManifestError, match="duplicate image_id values.*'a'"):
        read_manifest(str(path))
    nometa = tmp_path / "nometa.parquet"
    pq.write_table(t, nometa)
    with pytest.raises(ManifestError, match="mlray.labels"):
        read_manifest(str(nometa))
    rel = build_table(["a"], ["imgs/a.jpg"], [["cat"]])
    write_manifest(rel, ["cat"], str(tmp_path / "rel"))
    back, _ = read_manifest(str(tmp_path / "rel"))
    assert back.column("uri")[0].as_py() == str(tmp_path / "rel" / "imgs" / "a.jpg")
    bad_type = pa.table({"image_id": [1, 2], "uri": ["a", "b"], "labels": [["cat"], []]})
    p3 = tmp_path / "badtype.parquet"
    pq.write_table(bad_type.replace_schema_metadata(schema_with_vocab(bad_type.schema, ["cat"]).metadata), p3)
    with pytest.raises(ManifestError, match="'image_id' has type int64"):
        read_manifest(str(p3))


def test_packed_row_groups_stay_near_their_size_whatever_the_write_size(tmp_path):
    """A packed row group is what one training read task decodes: 2,000 images
    written as one table still become many ~8 MB groups, none over the limit by more
    than one image, and every row is there once."""
    from mlray.io.manifest import PACKED_ROW_GROUP_BYTES, build_table

    rng = np.random.default_rng(0)
    n, size = 200, 200_000  # 40 MB of incompressible "images" in one table
    blobs = [rng.bytes(size) for _ in range(n)]
    ids = [f"img_{i:04d}.jpg" for i in range(n)]
    files = write_manifest(build_table(ids, [None] * n, [["cat"]] * n, splits=["train"] * n, images=blobs),
                           ["cat"], str(tmp_path / "m"))
    groups = [(md.num_rows, md.total_byte_size) for f in files
              for md in (pq.ParquetFile(f).metadata.row_group(g) for g in range(pq.ParquetFile(f).metadata.num_row_groups))]
    assert len(groups) >= 40_000_000 // PACKED_ROW_GROUP_BYTES
    assert all(b <= PACKED_ROW_GROUP_BYTES + size + 4096 for _, b in groups), groups
    assert sum(r for r, _ in groups) == n
    back, _ = read_manifest(str(tmp_path / "m"), with_images=True)
    assert sorted(back.column("image_id").to_pylist()) == ids

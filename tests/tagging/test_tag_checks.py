"""What ``mlray tag`` checks before any work, without Ray: its options, OUT, the
image files it finds, and what kind of input it was given."""

from __future__ import annotations

import dataclasses

import pytest
from tag_outs import part

from mlray.io.manifest import build_table, write_manifest
from mlray.tagging.job import TagError, TagOptions, _describe_input, check_out, check_tag_options, list_images


def test_options_out_of_range_name_the_flag():
    check_tag_options(TagOptions())
    cases = [
        ({"batch_size": 0}, "--batch-size 0: must be an integer >= 1"),
        ({"rows_per_file": 2.5}, "--rows-per-file 2.5: must be an integer >= 1"),
        ({"lease_ttl": 5}, "--lease-ttl 5: must be >= 10"),
        ({"decode": "gpu"}, "--decode gpu: choose one of"),
        ({"actor_cpus": 0.0}, "--actor-cpus 0.0: must be > 0"),
        ({"threshold": 1.5}, "--threshold 1.5: must be between 0 and 1"),
        ({"threshold": 0.3, "top_k": 2}, "--threshold and --top-k choose labels two different ways"),
        ({"top_k": 0}, "--top-k 0: must be an integer >= 1"),
    ]
    for changes, message in cases:
        with pytest.raises(TagError) as e:
            check_tag_options(dataclasses.replace(TagOptions(), **changes))
        assert str(e.value).startswith(message), (changes, str(e.value))


def test_out_must_be_a_directory_that_can_be_created(tmp_path):
    check_out(str(tmp_path / "new" / "tags"))  # not there yet: fine
    (tmp_path / "tags").mkdir()
    check_out(str(tmp_path / "tags"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(TagError, match=f"--out {afile} is a file; OUT is a directory"):
        check_out(str(afile))
    with pytest.raises(TagError, match=f"{afile} is a file, so OUT cannot be created under it"):
        check_out(str(afile / "deeper" / "tags"))


def _tree(tmp_path):
    root = tmp_path / "imgs"
    for rel in ("a/1.jpg", "a/2.JPEG", "a/b/3.png", "c/4.webp", "c/notes.txt", "5.gif", "a/_hidden.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    return root


def test_image_files_under_a_prefix_or_a_glob_get_ids_relative_to_it(tmp_path):
    root = _tree(tmp_path)
    t = list_images(str(root))
    assert t.column_names == ["image_id", "uri"]
    assert t.column("image_id").to_pylist() == ["5.gif", "a/1.jpg", "a/2.JPEG", "a/b/3.png", "c/4.webp"]
    assert t.column("uri").to_pylist()[1] == str(root / "a" / "1.jpg")
    assert list_images(str(root) + "/").column("image_id").to_pylist() == t.column("image_id").to_pylist()
    assert list_images(str(root / "a" / "*.jpg")).column("image_id").to_pylist() == ["1.jpg"]
    # the id is relative to the part before the wildcard's segment
    assert list_images(str(root / "a" / "*" / "*.png")).column("image_id").to_pylist() == ["b/3.png"]
    assert list_images(str(root / "[ac]" / "*")).column("image_id").to_pylist() == [
        "a/1.jpg", "a/2.JPEG", "a/b/3.png", "c/4.webp"]
    with pytest.raises(TagError, match=r"--input .*\*\.bmp: no image files"):
        list_images(str(root / "*.bmp"))


def test_the_input_is_told_apart_manifest_packed_listing_or_embeddings(tmp_path):
    opts = TagOptions()
    ids = ["x.jpg", "y.jpg"]
    unpacked = str(tmp_path / "m")
    write_manifest(build_table(ids, [f"/img/{i}" for i in ids], [["cat"], []]), ["cat"], unpacked)
    inp = _describe_input(unpacked, opts)
    assert inp.manifest and not inp.packed and inp.columns == ["image_id", "uri"] and len(inp.parts) == 1
    assert _describe_input(inp.parts[0], opts).manifest  # one .parquet file is a manifest too
    packed = str(tmp_path / "p")
    write_manifest(build_table(ids, [None, None], [["cat"], []], images=[b"a", b"b"]), ["cat"], packed)
    inp = _describe_input(packed, opts)
    assert inp.manifest and inp.packed and inp.columns == ["image_id"]  # the bytes stay in storage
    root = _tree(tmp_path)
    inp = _describe_input(str(root), opts)
    assert not inp.manifest and inp.listing.num_rows == 5 and inp.parts is None  # hidden files left out
    source = str(tmp_path / "emb")
    part(source, [("x.jpg", None)], embedding={"model": "r@epoch1", "dim": 2, "backbone_digest": "d"})
    inp = _describe_input(source, dataclasses.replace(opts, from_embeddings=True))
    assert inp.manifest and inp.packed and inp.columns == ["image_id"] and inp.source.total == 1
    assert inp.parts == inp.source.files and inp.listing is None

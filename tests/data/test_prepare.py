"""prepare/stats: real images, real CSV/COCO files, manifests on local disk and on S3."""

from __future__ import annotations

import json
import os
import shutil
import uuid

import pyarrow.parquet as pq
import pytest

from mlray.io import storage
from mlray.cli import main
from mlray.io.manifest import LABELS_KEY, ManifestError, read_manifest
from mlray.data.prepare import prepare
from mlray.data.sources import SourceError


def _rows(csv_path):
    with open(csv_path) as f:
        return [line.rstrip("\n") for line in f]


@pytest.mark.slow  # the S3 server
@pytest.mark.parametrize("pack", [False, True])
def test_prepare_csv_to_s3_reads_back_with_plain_pyarrow(mosaics, bucket, s3_server, pack):
    root, csv_path = mosaics
    out = f"{bucket}/manifest"
    rc = main(["prepare", csv_path, "--images", root, "--out", out, "--split", "train=0.85,val=0.15"]
              + (["--pack"] if pack else []))
    assert rc == 0
    # Another team reads it with plain pyarrow + s3 settings, no mlray.
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=s3_server.access_key, secret_key=s3_server.secret_key,
        endpoint_override=f"127.0.0.1:{s3_server.port}", scheme="http", region="us-east-1",
    )
    table = pq.read_table(out.removeprefix("s3://"), filesystem=fs)
    assert table.num_rows == 300
    vocab = json.loads(table.schema.metadata[LABELS_KEY])
    assert vocab == [str(d) for d in range(10)]
    assert ("image" in table.column_names) == pack
    df = table.to_pandas()
    assert df["image_id"].is_unique
    assert set(df["split"]) == {"train", "val", "test"}
    # test rows keep the split given in the source CSV; the rest are stratified
    given_test = {line.split(",")[0] for line in _rows(csv_path)[1:] if line.endswith(",test")}
    assert set(df.loc[df["split"] == "test", "image_id"]) == given_test
    # labels match the one-hot CSV
    header = _rows(csv_path)[0].split(",")
    first = _rows(csv_path)[1].split(",")
    expected = sorted(h for h, v in zip(header[1:11], first[1:11]) if v == "1")
    assert sorted(df.set_index("image_id").loc[first[0], "labels"]) == expected
    if pack:
        row = df.set_index("image_id").loc[first[0]]
        assert row["image"] == open(os.path.join(root, first[0]), "rb").read()
    # and mlray reads and validates it back, stats included
    t2, v2 = read_manifest(out)
    assert t2.num_rows == 300 and v2 == vocab
    assert storage.exists(f"{out}/_stats.json")


def test_stats_command_reports_splits_and_labels(mosaics, tmp_path, capsys):
    root, csv_path = mosaics
    out = str(tmp_path / "m")
    prepare(csv_path, root, out, split="train=0.85,val=0.15")
    capsys.readouterr()
    assert main(["stats", out, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["images"] == 300 and s["labels"] == 10
    assert sum(s["images_per_split"].values()) == 300
    assert 1 <= s["labels_per_image"]["mean"] <= 4 and s["labels_per_image"]["max"] == 4
    assert s["duplicate_groups_across_splits"] == 0


def test_duplicate_content_stays_in_one_split_and_leakage_is_reported(mosaics, tmp_path):
    root, csv_path = mosaics
    img_root = tmp_path / "imgs"
    shutil.copytree(os.path.join(root, "images"), img_root / "images")
    lines = _rows(csv_path)
    # 30 extra copies of existing pictures under new names, no split given
    extra = []
    for i, line in enumerate(l for l in lines[1:] if not l.endswith(",test")):
        if i >= 30:
            break
        name = line.split(",")[0]
        copy = name.replace("mosaic_", "copy_")
        shutil.copy(img_root / name, img_root / copy)
        extra.append(copy + line[len(name):])
    src = tmp_path / "labels.csv"
    src.write_text("\n".join(lines + extra) + "\n")
    res = prepare(str(src), str(img_root), str(tmp_path / "m"), split="train=0.6,val=0.4", seed=3)
    assert res.stats["duplicate_content_groups"] == 30
    assert res.stats["duplicate_groups_across_splits"] == 0
    # Now force a copy into another split: stats must call it leakage.
    table, vocab = read_manifest(str(tmp_path / "m"))
    splits = table.column("split").to_pylist()
    ids = table.column("image_id").to_pylist()
    i = ids.index(extra[0].split(",")[0])
    splits[i] = "test" if splits[i] != "test" else "train"
    import pyarrow as pa

    leaked = table.set_column(table.column_names.index("split"), "split", pa.array(splits))
    from mlray.data.stats import manifest_stats

    s = manifest_stats(leaked, vocab)
    assert s["duplicate_groups_across_splits"] == 1
    assert extra[0].split(",")[0] in json.dumps(s["leakage_examples"])


def test_label_list_csv_and_parquet_and_label_names(mosaics, tmp_path):
    root, _ = mosaics
    names = sorted(os.listdir(os.path.join(root, "images")))[:6]
    csv_path = tmp_path / "lists.csv"
    csv_path.write_text(
        "filename,tags\n"
        f'images/{names[0]},"[cat, dog]"\n'
        f"images/{names[1]},cat|bird\n"
        f"images/{names[2]},\"['dog']\"\n"
        f"images/{names[3]},\n"
    )
    res = prepare(str(csv_path), root, str(tmp_path / "m1"), split="train=1")
    table, vocab = read_manifest(str(tmp_path / "m1"))
    assert vocab == ["bird", "cat", "dog"]
    got = dict(zip(table.column("image_id").to_pylist(), table.column("labels").to_pylist()))
    assert sorted(got[f"images/{names[0]}"]) == ["cat", "dog"]
    assert got[f"images/{names[3]}"] == []
    assert res.stats["images_without_labels"] == 1

    import pyarrow as pa

    pq_path = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"path": [f"images/{n}" for n in names[:2]], "labels": [["a"], ["b", "a"]]}), pq_path)
    names_file = tmp_path / "names.csv"
    names_file.write_text("Labels\nb\na\nc\n")
    prepare(str(pq_path), root, str(tmp_path / "m2"), split="train=1", label_names=str(names_file))
    _, vocab2 = read_manifest(str(tmp_path / "m2"))
    assert vocab2 == ["b", "a", "c"]


def test_one_hot_with_index_header_and_names_file(mosaics, tmp_path):
    root, _ = mosaics
    names = sorted(os.listdir(os.path.join(root, "images")))[:3]
    src = tmp_path / "idx.csv"
    src.write_text("filename,0,1\n" + "".join(f"images/{n},1,{i % 2}\n" for i, n in enumerate(names)))
    (tmp_path / "names.txt").write_text("person\ndog\n")
    prepare(str(src), root, str(tmp_path / "m"), split="train=1", label_names=str(tmp_path / "names.txt"))
    table, vocab = read_manifest(str(tmp_path / "m"))
    assert vocab == ["person", "dog"]
    assert sorted(map(len, table.column("labels").to_pylist())) == [1, 1, 2]


def test_coco_import_keeps_images_without_annotations(mosaics, tmp_path):
    root, _ = mosaics
    names = sorted(os.listdir(os.path.join(root, "images")))[:3]
    coco = {
        "images": [{"id": 10 + i, "file_name": f"images/{n}", "width": 64, "height": 64} for i, n in enumerate(names)],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 2, "name": "bicycle"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 1, "bbox": [0, 0, 1, 1]},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [0, 0, 2, 2]},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 1, 1]},
            {"id": 4, "image_id": 11, "category_id": 2, "bbox": [0, 0, 1, 1]},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    prepare(str(tmp_path / "coco.json"), root, str(tmp_path / "m"), split="train=1")
    table, vocab = read_manifest(str(tmp_path / "m"))
    assert vocab == ["person", "bicycle", "car"]  # category id order
    got = dict(zip(table.column("image_id").to_pylist(), table.column("labels").to_pylist()))
    assert sorted(got[f"images/{names[0]}"]) == ["car", "person"]
    assert got[f"images/{names[1]}"] == ["bicycle"]
    assert got[f"images/{names[2]}"] == []


@pytest.mark.slow  # the S3 server
def test_images_root_on_s3(mosaics, bucket, tmp_path):
    root, csv_path = mosaics
    storage.upload_dir(os.path.join(root, "images"), f"{bucket}/raw/images")
    res = prepare(csv_path, f"{bucket}/raw", f"{bucket}/m", split="train=0.85,val=0.15", pack=True)
    assert res.stats["images"] == 300
    table, _ = read_manifest(f"{bucket}/m", with_images=True)
    assert table.column("uri")[0].as_py().startswith(f"{bucket}/raw/images/")
    assert all(len(b) > 100 for b in table.column("image").to_pylist())


# ---- bad input: each error names the problem ------------------------------------


def _bad(tmp_path, text, root, **kw):
    p = tmp_path / kw.pop("name", "bad.csv")
    p.write_text(text)
    with pytest.raises(SourceError) as e:
        prepare(str(p), root, str(tmp_path / "out"), **kw)
    return str(e.value)


def test_bad_one_hot_inputs_are_named(mosaics, tmp_path):
    root, _ = mosaics
    n = sorted(os.listdir(os.path.join(root, "images")))[:2]
    msg = _bad(tmp_path, f"filename,cat,dog\nimages/{n[0]},1,2\n", root)
    assert "row 2" in msg and "'dog'" in msg and "'2'" in msg
    msg = _bad(tmp_path, f"filename,cat,,dog\nimages/{n[0]},1,0,1\n", root)
    assert "empty name" in msg and "column 3" in msg
    msg = _bad(tmp_path, f"filename,cat,cat\nimages/{n[0]},1,0\n", root)
    assert "'cat' appears twice" in msg
    msg = _bad(tmp_path, f"filename,cat\nimages/{n[0]},1\nimages/{n[0]},0\n", root)
    assert "duplicate image ids" in msg and "rows [2, 3]" in msg
    msg = _bad(tmp_path, "", root)
    assert "empty" in msg
    msg = _bad(tmp_path, "filename,cat\n", root)
    assert "no rows" in msg
    msg = _bad(tmp_path, f"filename,cat\nimages/{n[0]},1\nimages/nope.jpg,0\n", root)
    assert "row 3" in msg and "nope.jpg" in msg and "--skip-missing" in msg


def test_bad_split_spec_and_skip_missing(mosaics, tmp_path):
    root, _ = mosaics
    n = sorted(os.listdir(os.path.join(root, "images")))[:2]
    p = tmp_path / "l.csv"
    p.write_text(f"filename,cat\nimages/{n[0]},1\nimages/gone.jpg,0\nimages/{n[1]},0\n")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        prepare(str(p), root, str(tmp_path / "o"), split="train=0.5,dev=0.5", skip_missing=True)
    res = prepare(str(p), root, str(tmp_path / "o"), split="train=1", skip_missing=True)
    assert res.missing == ["images/gone.jpg"] and res.stats["images"] == 2
    assert res.stats["missing_images"] == ["images/gone.jpg"]


def test_coco_that_is_not_coco(tmp_path, mosaics):
    root, _ = mosaics
    msg = _bad(tmp_path, json.dumps({"info": {}, "licenses": []}), root, name="x.json")
    assert "not a COCO instances file" in msg and "'images'" in msg
    msg = _bad(tmp_path, "{not json", root, name="y.json")
    assert "not valid JSON" in msg
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "a"}],
           "annotations": [{"image_id": 2, "category_id": 1}]}
    msg = _bad(tmp_path, json.dumps(doc), root, name="z.json")
    assert "annotations[0]" in msg and "image_id 2" in msg



# ---- where the images are: relative paths, file://, a manifest moved or synced to S3 ----


def _first_contact_layout(mosaics, where, n=120, keep_prefix=False):
    """``where/images/*.jpg`` and ``where/labels.csv`` naming them relative to
    ``images/`` (the layout a new user starts from; relative to ``where`` with
    ``keep_prefix``): filename and one-hot columns, no split column (``--split``
    decides); returns the data rows."""
    root, csv_path = mosaics
    lines = [line.rsplit(",", 1)[0] for line in _rows(csv_path)]  # the fixture's last column is its split
    assert _rows(csv_path)[0].endswith(",split")
    rows = lines[1 : n + 1]
    (where / "images").mkdir(parents=True)
    for line in rows:
        name = line.split(",")[0]
        shutil.copy(os.path.join(root, name), where / name)
    named = rows if keep_prefix else [r.removeprefix("images/") for r in rows]
    (where / "labels.csv").write_text("\n".join([lines[0]] + named) + "\n")
    return rows


def _every_uri_reads(manifest):
    table, _ = read_manifest(manifest)
    uris = table.column("uri").to_pylist()
    assert uris and all(not isinstance(b, Exception) for b in storage.fetch_many(uris))
    return uris


def test_relative_images_and_out_store_uris_relative_to_the_manifest(mosaics, tmp_path, monkeypatch):
    """`--images images --out manifest` from the data folder: URIs relative to the
    manifest's directory, readable from any working directory; `file://` and
    relative paths that climb out of the current directory mean the same."""
    rows = _first_contact_layout(mosaics, tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    assert main(["prepare", "labels.csv", "--images", "images", "--out", "manifest"]) == 0
    stored = pq.read_table("manifest").column("uri").to_pylist()
    assert len(stored) == len(rows) and all(u.startswith("../images/mosaic_") for u in stored)
    monkeypatch.chdir(tmp_path)  # read from elsewhere: the manifest's directory counts, not the current one
    uris = _every_uri_reads("work/manifest")
    assert all(u.startswith(str(tmp_path / "work" / "images") + "/") for u in uris)
    monkeypatch.chdir(tmp_path / "work")
    assert main(["prepare", "labels.csv", "--images", f"file://{tmp_path}/work/images", "--out",
                 f"file://{tmp_path}/work/m2"]) == 0
    assert set(pq.read_table(str(tmp_path / "work" / "m2")).column("uri").to_pylist()) == set(stored)
    (tmp_path / "work" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "work" / "sub")
    assert main(["prepare", "../labels.csv", "--images", "../images", "--out", "../../out/m"]) == 0
    stored = pq.read_table(str(tmp_path / "out" / "m")).column("uri").to_pylist()
    assert all(u.startswith("../../work/images/mosaic_") for u in stored)
    assert len(_every_uri_reads(str(tmp_path / "out" / "m"))) == len(rows)


@pytest.mark.slow
def test_a_manifest_moved_or_synced_to_s3_with_its_images_still_reads(mosaics, tmp_path, monkeypatch, bucket,
                                                                      s3_server):
    """The relative layout travels: the folder holding the manifest and its images
    moved on disk, or uploaded to S3 as is, reads every image; a relative URI that
    climbs above its bucket is refused by name."""
    rows = _first_contact_layout(mosaics, tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    assert main(["prepare", "labels.csv", "--images", "images", "--out", "manifest"]) == 0
    moved = tmp_path / "elsewhere" / "project"
    moved.parent.mkdir()
    shutil.move(tmp_path / "work", moved)
    monkeypatch.chdir(tmp_path)
    assert main(["stats", str(moved / "manifest"), "--json"]) == 0
    uris = _every_uri_reads(str(moved / "manifest"))
    assert len(uris) == len(rows) and all(u.startswith(f"{moved}/images/") for u in uris)

    storage.upload_dir(str(moved), f"{bucket}/project")
    uris = _every_uri_reads(f"{bucket}/project/manifest")
    assert len(uris) == len(rows) and all(u.startswith(f"{bucket}/project/images/mosaic_") for u in uris)
    # the manifest alone at the top of a bucket: '../images' would leave it
    top = s3_server.create_bucket(f"top{uuid.uuid4().hex[:12]}")
    for f in storage.list_files(f"{bucket}/project/manifest"):
        storage.write_bytes(f"{top}/{f.rsplit('/', 1)[1]}", storage.read_bytes(f))
    with pytest.raises(ManifestError, match=r"'\.\./images/mosaic_\d+\.jpg'.*climbs above the bucket"):
        read_manifest(top)


@pytest.mark.slow
@pytest.mark.parametrize("images, out", [("images", "manifest"), ("../data", "out/m")])
def test_first_prepare_with_relative_paths_then_train_decodes_every_image(mosaics, tmp_path, monkeypatch,
                                                                          images, out, local_ray):
    """A new user's first two commands, with relative paths as typed: prepare, then
    a short real training that decodes every image of the manifest."""
    from mlray.model import rundir

    if images == "images":  # labels.csv and images/ in the current directory
        _first_contact_layout(mosaics, tmp_path / "work")
        labels = "labels.csv"
    else:  # a data folder beside it, its CSV naming images/x.jpg
        _first_contact_layout(mosaics, tmp_path / "data", keep_prefix=True)
        (tmp_path / "work").mkdir()
        labels = "../data/labels.csv"
    monkeypatch.chdir(tmp_path / "work")
    assert main(["prepare", labels, "--images", images, "--out", out, "--split", "train=0.8,val=0.2"]) == 0
    (tmp_path / "work" / "tiny.yaml").write_text(
        "data: {image_size: 64, batch_size: 32, max_error_fraction: 0}\n"
        "optim: {epochs: 1, freeze_epochs: 1, warmup_epochs: 0.2}\n"
    )
    assert main(["train", "--config", "tiny.yaml", f"data.manifest={out}", "run.storage_path=runs",
                 "run.name=first", "scaling.num_workers=1", "scaling.cpus_per_worker=0.5"]) == 0
    table, _ = read_manifest(str(tmp_path / "work" / out))
    n_train = table.column("split").to_pylist().count("train")
    hist = rundir.read_history(str(tmp_path / "work" / "runs" / "first"))
    # max_error_fraction=0: one unreadable train or val image would have failed the run
    assert len(hist) == 1 and hist[0]["decode_errors"] == 0
    assert n_train - 32 < hist[0]["train_images"] <= n_train  # the whole split, less a partial last batch

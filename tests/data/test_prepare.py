import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.data.builtin import write_builtin
from pipelines.data.prepare import open_prepared, prepare, sample_hash
from ssd import config as C
from ssd.anchors import default_boxes
from ssd.config import with_classes
from ssd.matching import encode_targets


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    root = tmp_path_factory.mktemp("builtin")
    write_builtin(root, seed=3, train_images=6, val_images=4)
    return root


def test_prepare_writes_samples_then_reuses_them_until_the_preset_changes(ray_local, builtin, tmp_path):
    source = str(builtin / "annotations" / "instances_val.json")
    out = tmp_path / "prepared"
    first = prepare(source, out, C.preset("tiny"), splits=(None,))
    assert not first.reused and first.splits["all"]["rows"] == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sample_hash"] == sample_hash(
        with_classes(C.preset("tiny"), tuple(manifest["info"]["class_names"]))
    )
    assert (out / "reports" / "all" / "ingest_report.json").is_file()

    again = prepare(source, out, C.override(C.preset("tiny"), ["train.lr=0.5"]), splits=(None,))
    assert again.reused  # optimiser settings don't change a sample

    other = prepare(source, out, C.override(C.preset("tiny"), ["anchors.min_scale=0.15"]), splits=(None,))
    assert not other.reused  # different default boxes: new targets


def test_prepared_targets_equal_direct_matching(ray_local, builtin, tmp_path):
    source = str(builtin / "annotations" / "instances_val.json")
    result = prepare(source, tmp_path / "p", C.preset("tiny"), splits=(None,))
    cfg = C.from_dict(result.manifest["config"])
    table = pd.DataFrame(open_prepared(tmp_path / "p").dataset("all").take_all())
    coco = json.loads((builtin / "annotations" / "instances_val.json").read_text())
    cat_to_label = {c["id"]: i + 1 for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    images = {im["id"]: im for im in coco["images"]}
    for _, row in table.iterrows():
        im = images[int(row["image_id"])]
        anns = [a for a in coco["annotations"] if a["image_id"] == row["image_id"] and not a["iscrowd"]]
        boxes = torch.tensor(
            [
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in anns
            ],
            dtype=torch.float32,
        ).reshape(-1, 4)
        boxes /= torch.tensor([im["width"], im["height"], im["width"], im["height"]])
        labels = torch.tensor([cat_to_label[a["category_id"]] for a in anns])
        cls_t, loc_t = encode_targets(boxes, labels, default_boxes(cfg))
        assert np.array_equal(np.asarray(row["cls_targets"]), cls_t.numpy())
        np.testing.assert_allclose(row["loc_targets"], loc_t.numpy(), atol=1e-5)


def test_prepare_cli_reports_and_reuses(ray_local, builtin, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "jobs.prepare",
        "--data",
        str(builtin / "annotations" / "instances_val.json"),
        "--out",
        str(tmp_path / "cli"),
        "--splits",
        "all",
        "--address",
        "auto",
    ]  # the session's Ray
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "4 samples" in first.stdout and "written" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "up to date, reused" in second.stdout


def test_prepare_cli_rejects_an_unknown_source_clearly(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.prepare",
            "--data",
            str(tmp_path / "notes.txt"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "notes.txt" in out.stderr and "Traceback" not in out.stderr


def test_prepared_samples_carry_the_ground_truth_and_refuse_another_config(ray_local, builtin, tmp_path):
    from pipelines.data.datasets import coco_ground_truth, detect_source, read_dataset
    from pipelines.data.prepare import open_prepared

    source = str(builtin / "annotations" / "instances_val.json")
    out = tmp_path / "p"
    halves = C.override(C.preset("tiny"), ["data.val_fraction=0.5"])  # 2 of the 4 images in val
    prepare(source, out, halves, splits=("train", "val"))
    prepared = open_prepared(out)
    assert prepared.splits == ("train", "val") and prepared.split_for("val") == "val"
    rows, info, _ = read_dataset(source, split="val", val_fraction=0.5)
    expected = coco_ground_truth(rows, info)
    got = prepared.ground_truth("val")
    assert sorted(im["id"] for im in got["images"]) == sorted(im["id"] for im in expected["images"])
    key = lambda a: (a["image_id"], a["bbox"])  # noqa: E731
    assert [(a["category_id"], a["iscrowd"]) for a in sorted(got["annotations"], key=key)] == [
        (a["category_id"], a["iscrowd"]) for a in sorted(expected["annotations"], key=key)
    ]
    np.testing.assert_allclose(
        [a["bbox"] for a in sorted(got["annotations"], key=key)],
        [a["bbox"] for a in sorted(expected["annotations"], key=key)],
        atol=1e-4,
    )
    inputs = prepared.dataset("val", targets=False).take_batch(2)
    assert set(inputs) == {"image_id", "width", "height", "image"}  # no matching targets read

    assert prepared.check(C.override(C.preset("tiny"), ["train.lr=0.5"])).data.class_names == info.class_names
    with pytest.raises(
        ValueError, match=r"prepared for preset tiny \(128px.* needs preset ssdlite320 \(320px"
    ):
        prepared.check(C.preset("tiny").__class__(**{**C.preset("ssdlite320").__dict__}))
    with pytest.raises(ValueError, match="holds prepared samples"):
        detect_source(out)  # evaluate and label are told to give the source itself

    again = prepare(
        source, out, C.override(C.preset("tiny"), ["data.val_fraction=0.25"]), splits=("train", "val")
    )
    assert not again.reused  # another train / val cut: other samples in each split
    (out / "val" / sorted(p.name for p in (out / "val").glob("*.parquet"))[0]).unlink()
    with pytest.raises(ValueError, match="changed after prepare"):
        open_prepared(out)


def test_photos_prepare_compact_beside_bad_inputs_and_expand_to_the_direct_samples(ray_local, tmp_path):
    """A COCO-shaped set of real 640x480 photos at SSD300, with a truncated JPEG, a missing
    image and a pixel bomb inside (`benchmarks.bench_scale`, as at 118k images)."""
    from benchmarks.bench_scale import coco_set, photo_pool, pixel_bomb
    from pipelines.data.datasets import read_dataset
    from pipelines.data.samples import preprocess

    pool = photo_pool(tmp_path / "pool", count=4)
    annotations, bad = coco_set(tmp_path / "coco", 12, pool, pixel_bomb(tmp_path / "bomb.png"))
    cfg = C.preset("ssd300_vgg16")
    result = prepare(annotations, tmp_path / "p", cfg, splits=(None,))
    report = json.loads(Path(result.splits["all"]["report"]).read_text())
    assert {(e["kind"], Path(e["file"]).name) for e in report["entries"]} == set(bad.items())
    assert "too_large" in bad and "20000x20000" not in str(report)  # refused from the count alone
    [bomb] = [e["detail"] for e in report["entries"] if e["kind"] == "too_large"]
    assert bomb.startswith("400,000,000 pixels is more than the 178,956,970")
    assert result.splits["all"]["rows"] == 9 and report["counts"]["too_large"] == 1

    written = pq.read_table(str(tmp_path / "p" / "all"))
    assert "image" not in written.column_names and "cls_targets" not in written.column_names
    assert written.column("image_jpeg").type == pa.binary()
    assert written.schema.field("matches").type.value_type == pa.int16()
    per_image = sum(f.stat().st_size for f in (tmp_path / "p" / "all").glob("*.parquet")) / 9
    source = np.mean([p.stat().st_size for p in pool])
    assert per_image < 0.8 * source  # the goal is <= 1x: fewer bytes than the photos themselves

    prepared = {r["image_id"]: r for r in open_prepared(tmp_path / "p").dataset("all").take_all()}
    rows, info, _ = read_dataset(annotations)
    direct = preprocess(rows, with_classes(cfg, info.class_names), train=False, workers=1).take_all()
    assert sorted(prepared) == sorted(r["image_id"] for r in direct)
    for row in direct:
        got = prepared[row["image_id"]]
        assert got["cls_targets"].dtype == row["cls_targets"].dtype
        assert np.array_equal(got["cls_targets"], row["cls_targets"]) and (row["cls_targets"] > 0).any()
        np.testing.assert_array_equal(got["loc_targets"], row["loc_targets"])  # the same gather
        difference = np.abs(got["image"].astype(np.int16) - row["image"])
        assert got["image"].shape == (3, 300, 300) and difference.mean() < 1.5 and difference.max() < 48


def test_training_expands_prepared_samples_once_only_where_they_fit_in_half_the_object_store():
    from pipelines.data.samples import expanded_sample_bytes
    from pipelines.train.datasets import expand_once

    ssd300 = C.preset("ssd300_vgg16")
    assert ssd300.anchors.num_default_boxes() == 8732
    assert expanded_sample_bytes(ssd300) == 3 * 300 * 300 + 8732 * (2 + 16) + 24  # int16 classes
    store = 7 * 2**30  # Ray's default on 24 GiB: 30 % of the memory
    assert expand_once(12_000, C.preset("tiny"), store)  # the quickstart: read, not decoded, each epoch
    assert expand_once(8_000, ssd300, store) and not expand_once(9_000, ssd300, store)
    assert not expand_once(118_000, ssd300, store)  # COCO: decoded by CPU workers each epoch


def test_the_fingerprint_of_data_in_a_bucket_leaves_out_the_runs_kept_beside_it(bucket, tmp_path):
    """`--data s3://B/coco/annotations/x.json --storage s3://B/runs`: the fingerprinted root
    (the bucket) holds the runs; their checkpoints must not make the samples look stale, while
    a new image does."""
    import boto3

    from pipelines.data.prepare import source_fingerprint

    name = bucket.removeprefix("s3://")
    client = boto3.client("s3")
    client.put_object(Bucket=name, Key="annotations/x.json", Body=b'{"images": []}')
    client.put_object(Bucket=name, Key="images/a.jpg", Body=b"a")
    source, leave_out = f"{bucket}/annotations/x.json", (f"{bucket}/runs", f"{bucket}/runs/samples/x")
    before = source_fingerprint(source, ignore=leave_out)
    client.put_object(Bucket=name, Key="runs/r/epoch_0001/checkpoint.pt", Body=b"weights")
    assert source_fingerprint(source, ignore=leave_out) == before
    assert source_fingerprint(source) != before  # without leaving it out, it would count
    client.put_object(Bucket=name, Key="images/b.jpg", Body=b"b")
    assert source_fingerprint(source, ignore=leave_out) != before

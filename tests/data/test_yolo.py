"""YOLO datasets (Ultralytics layout) as a data source: names as a list or a dict, splits as
folders or image lists, normalised boxes and polygons, and every bad line in the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.data.datasets import read_dataset
from pipelines.data.sources import open_source
from pipelines.data.yolo import label_path


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)


def _labels(path: Path, *lines: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def yolo(tmp_path) -> Path:
    root = tmp_path / "pets"
    _image(root / "images" / "train" / "a.jpg", 40, 30)
    _image(root / "images" / "train" / "b.png", 20, 20)
    _image(root / "images" / "train" / "c.jpg", 20, 20)  # no label file: no objects
    _image(root / "images" / "val" / "v.jpg", 40, 40)
    _labels(
        root / "labels" / "train" / "a.txt",
        "0 0.5 0.5 0.5 0.5",  # cat [10, 7.5, 30, 22.5]
        "1 0.1 0.1 0.2 0.2 0.3 0.3",  # a polygon: dog [4, 3, 12, 9]
        "1 0.5 0.5 0.2",  # 4 numbers
        "",
        "5 0.5 0.5 0.1 0.1",  # class 5 of 2
        "0 0.95 0.5 0.2 0.2",  # reaches past the right edge: clipped
        "0 0.5 0.5 0 0.1",  # no width
    )
    _labels(root / "labels" / "train" / "b.txt", "1 0.5 0.5 1 1")
    _labels(root / "labels" / "val" / "v.txt", "0 0.25 0.25 0.5 0.5")
    (root / "val.txt").write_text("./images/val/v.jpg\n")
    config = {"path": "pets", "train": "images/train", "val": "val.txt", "names": {0: "cat", 1: "dog"}}
    (tmp_path / "pets.yaml").write_text(yaml.safe_dump(config))  # beside the root, as Ultralytics keeps them
    return tmp_path / "pets.yaml"


def test_a_yolo_dataset_reads_with_every_bad_line_reported(ray_local, yolo):
    assert open_source(yolo).kind == "yolo"
    rows, info, report = read_dataset(yolo)
    assert info.kind == "yolo" and info.class_names == ("cat", "dog") and info.num_images == 4
    by_name = {Path(r["path"]).name: r for r in rows.take_all()}
    assert sorted(by_name) == ["a.jpg", "b.png", "c.jpg", "v.jpg"]
    a = by_name["a.jpg"]
    assert (a["width"], a["height"]) == (40, 30)
    np.testing.assert_allclose(a["boxes"], [[10, 7.5, 30, 22.5], [4, 3, 12, 9], [34, 12, 40, 18]])
    assert list(a["labels"]) == [1, 2, 1]
    np.testing.assert_allclose(by_name["b.png"]["boxes"], [[0, 0, 20, 20]])
    assert len(by_name["c.jpg"]["boxes"]) == 0
    counts = {kind: n for kind, n in report.counts.items() if n}
    assert counts == {"invalid_box": 1, "unknown_category": 1, "zero_area": 1, "clipped": 1}
    details = {e.kind: e.detail for e in report.entries}
    assert "expected class cx cy w h" in details["invalid_box"]
    assert details["invalid_box"].startswith("a.txt line 3 ('1 0.5 0.5 0.2'") and details[
        "unknown_category"
    ].startswith("a.txt line 5")
    assert "'5'" in details["unknown_category"] and "ids 0..1" in details["unknown_category"]
    assert all(e.file.endswith("labels/train/a.txt") for e in report.entries)

    val, val_info, _ = read_dataset(open_source(yolo), split="val")
    [v] = val.take_all()
    assert v["image_id"] == by_name["v.jpg"]["image_id"] and val_info.split_method == "source"
    np.testing.assert_allclose(v["boxes"], [[0, 0, 20, 20]])
    train, _, _ = read_dataset(yolo, split="train")
    assert train.count() == 3

    from pipelines.data.datasets import coco_ground_truth
    from pipelines.label.batch import require_labelled_source

    assert require_labelled_source(yolo).kind == "yolo"  # rayssd evaluate and label --evaluate take it
    truth = coco_ground_truth(rows, info)  # what they score against
    assert [c["name"] for c in truth["categories"]] == ["cat", "dog"] and len(truth["annotations"]) == 5


def test_names_as_a_list_and_bad_yaml_files_are_clear(tmp_path, yolo):
    config = yaml.safe_load(yolo.read_text())
    listed = tmp_path / "listed.yml"
    listed.write_text(yaml.safe_dump({**config, "names": ["cat", "dog"]}))
    assert open_source(listed).yolo["names"] == ["cat", "dog"]
    for bad, message in [
        ({**config, "names": {0: "cat", 2: "dog"}}, "expected 0..1"),
        ({**config, "nc": 3}, "nc is 3 but names lists 2"),
        ({"train": "images/train"}, "no 'names'"),
        ({"names": ["cat"]}, "names no images"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=message):
            open_source(path)
    with pytest.raises(ValueError, match="no 'test' entry; its splits: \\['train', 'val'\\]"):
        read_dataset(yolo, split="test")


def test_label_files_sit_where_ultralytics_looks():
    assert label_path("/d/images/train/x.jpg") == "/d/labels/train/x.txt"
    assert label_path("/images/d/images/y.png") == "/images/d/labels/y.txt"  # the last images/ only
    assert label_path("images/train/a.b.jpg") == "labels/train/a.b.txt"  # a path inside a bucket


def test_a_yolo_dataset_prepares_its_own_train_and_val_splits(ray_local, yolo, tmp_path):
    from pipelines.data.prepare import open_prepared, prepare
    from ssd import config as C

    result = prepare(yolo, tmp_path / "prepared", C.preset("tiny"))
    assert {name: split["rows"] for name, split in result.splits.items()} == {"train": 3, "val": 1}
    prepared = open_prepared(tmp_path / "prepared")
    assert prepared.info("train").class_names == ("cat", "dog")
    assert prepare(yolo, tmp_path / "prepared", C.preset("tiny")).reused
    _labels(yolo.parent / "pets" / "labels" / "val" / "v.txt", "1 0.5 0.5 0.5 0.5")  # a label edited
    assert not prepare(yolo, tmp_path / "prepared", C.preset("tiny")).reused


def test_exports_with_a_missing_test_folder_and_an_unreadable_label_file(ray_local, yolo, tmp_path):
    config = yaml.safe_load(yolo.read_text())
    roboflow = tmp_path / "export.yaml"  # Roboflow's style: ../train/images, and a test folder left out
    roboflow.write_text(yaml.safe_dump({**config, "train": "../images/train", "test": "../test/images"}))
    (yolo.parent / "pets" / "labels" / "train" / "c.txt").write_bytes(b"\xff\xfe not text")
    rows, _, report = read_dataset(roboflow, split="train")  # ../images/train found inside path
    assert sorted(Path(r["path"]).name for r in rows.take_all()) == ["a.jpg", "b.png"]
    [unreadable] = [e for e in report.entries if e.kind == "unreadable"]
    assert unreadable.file.endswith("labels/train/c.txt") and report.images_kept == 2
    with pytest.raises(ValueError, match=r"'\.\./test/images'.*is no folder of images"):
        read_dataset(roboflow, split="test")  # asked for by name: an error, not a skip
    posed = tmp_path / "pose.yaml"
    posed.write_text(yaml.safe_dump({**config, "kpt_shape": [17, 3]}))
    with pytest.raises(ValueError, match="pose dataset"):
        open_source(posed)


def test_a_yolo_dataset_in_a_bucket_reads_as_its_local_copy(ray_local, yolo, bucket):
    """`--data s3://BUCKET/pets.yaml` (a real S3 API): its relative `path`, split folders and
    image lists resolve in the bucket, with the same boxes, labels and report."""
    from tests.storage import upload_tree

    remote = f"{upload_tree(yolo.parent, f'{bucket}/yolo')}/pets.yaml"
    assert open_source(remote).kind == "yolo"
    for split in ("train", "val"):
        local, _, local_report = read_dataset(yolo, split=split)
        rows, _, report = read_dataset(remote, split=split)
        mine = {Path(r["path"]).name: r for r in local.take_all()}
        theirs = {Path(r["path"]).name: r for r in rows.take_all()}
        assert sorted(theirs) == sorted(mine) and all(
            r["path"].startswith(f"{bucket}/yolo/") for r in theirs.values()
        )
        for name, row in theirs.items():
            np.testing.assert_allclose(row["boxes"], mine[name]["boxes"])
            assert list(row["labels"]) == list(mine[name]["labels"])
        assert dict(report.counts) == dict(local_report.counts)

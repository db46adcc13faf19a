"""Ingest of COCO, Pascal VOC and image-folder sources into Ray Data rows, with validation.

Fixtures are a handful of tiny images written with PIL into tmp_path; every read goes
through the session's local Ray instance (`ray_local`)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.datasets import (
    DatasetInfo,
    DataValidationError,
    coco_ground_truth,
    detect_source,
    read_dataset,
)
from pipelines.data.sources import fraction_split
from pipelines.data.validation import PROBLEM_KINDS, REPORT_FILE
from pipelines.data.voc import VOC_CLASSES
from ssd.evaluate import CocoEvaluator


def _image(path: Path, width: int = 40, height: int = 30, seed: int = 0) -> Path:
    """Random-noise image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * 0.6)])  # header intact, entropy-coded data cut short
    return path


def _write_coco(path: Path, images: list[tuple], annotations: list[tuple], categories: list[tuple]) -> Path:
    """images: (id, file_name, w, h); annotations: (id, image_id, category_id, [x, y, w, h], iscrowd)."""
    doc = {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": [
            {"id": a, "image_id": i, "category_id": c, "bbox": b, "iscrowd": crowd, "area": b[2] * b[3]}
            for a, i, c, b, crowd in annotations
        ],
        "categories": [{"id": c, "name": n} for c, n in categories],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _rows(dataset) -> dict[int, dict]:
    return {int(row["image_id"]): row for row in dataset.take_all()}


def test_coco_odd_category_ids_map_to_contiguous_labels_and_back(ray_local, tmp_path):
    # COCO's own layout: annotations/instances_val2017.json next to val2017/ holding the images.
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _image(tmp_path / "val2017" / name)
    source = _write_coco(
        tmp_path / "annotations" / "instances_val2017.json",
        images=[(5, "a.jpg", 40, 30), (12, "b.jpg", 40, 30), (7, "c.jpg", 40, 30)],
        annotations=[
            (1, 5, 17, [1, 2, 10, 8], 0),
            (2, 5, 90, [5, 5, 20, 20], 1),  # a crowd region
            (3, 12, 3, [0, 0, 40, 30], 0),
        ],
        categories=[(90, "toothbrush"), (3, "car"), (17, "cat")],
    )
    dataset, info, report = read_dataset(source)

    assert info.kind == "coco" and info.split is None and info.num_images == 3 and info.num_boxes == 3
    assert info.category_ids == (3, 17, 90)  # label k = k-th smallest id
    assert info.class_names == ("car", "cat", "toothbrush")
    assert info.image_root == str(tmp_path / "val2017")
    assert report.num_problems == 0 and report.images_kept == 3
    rows = _rows(dataset)
    assert sorted(rows) == [5, 7, 12]
    a = rows[5]
    assert a["path"] == str(tmp_path / "val2017" / "a.jpg")
    assert (a["width"], a["height"]) == (40, 30)
    np.testing.assert_array_equal(a["boxes"], [[1, 2, 11, 10], [5, 5, 25, 25]])  # xywh -> xyxy
    assert a["boxes"].dtype == np.float32
    np.testing.assert_array_equal(a["labels"], [2, 3])
    np.testing.assert_array_equal(a["ignore"], [False, True])
    assert [info.label_to_category_id()[int(k)] for k in a["labels"]] == [17, 90]
    assert info.category_id_to_label() == {3: 1, 17: 2, 90: 3}
    assert rows[7]["boxes"].shape == (0, 4) and rows[7]["labels"].shape == (0,)

    ground_truth = coco_ground_truth(dataset, info)
    assert sorted(image["id"] for image in ground_truth["images"]) == [5, 7, 12]
    by_category = {ann["category_id"]: ann for ann in ground_truth["annotations"]}
    assert by_category[90]["iscrowd"] == 1 and by_category[17]["bbox"] == [1, 2, 10, 8]
    # The ground truth as detections scores a perfect AP through pycocotools; the crowd is ignored.
    evaluator = CocoEvaluator(ground_truth, info.label_to_category_id())
    ids = sorted(rows)
    keep = [~rows[i]["ignore"] for i in ids]
    evaluator.update(
        ids,
        [rows[i]["boxes"][k] for i, k in zip(ids, keep)],
        [np.ones(int(k.sum())) for k in keep],
        [rows[i]["labels"][k] for i, k in zip(ids, keep)],
    )
    assert evaluator.summarize()["map"] == pytest.approx(1.0)


def _voc_xml(name: str, width: int, height: int, objects: list[tuple]) -> str:
    """objects: (class name, difficult, xmin, ymin, xmax, ymax) in VOC's 1-based pixels."""
    parts = [f"<annotation><filename>{name}.jpg</filename>"]
    parts.append(f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>")
    for cls, difficult, *corners in objects:
        box = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), corners))
        parts.append(
            f"<object><name>{cls}</name><difficult>{difficult}</difficult><bndbox>{box}</bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def _voc_root(root: Path) -> Path:
    objects = {
        "a": [("dog", 0, 1, 1, 20, 10), ("person", 1, 5, 5, 40, 30)],
        "b": [("cat", 0, 2, 3, 12, 13)],
        "c": [("car", 0, 1, 1, 40, 30)],
    }
    (root / "Annotations").mkdir(parents=True)
    for seed, (name, objs) in enumerate(objects.items()):
        _image(root / "JPEGImages" / f"{name}.jpg", seed=seed)
        (root / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, 40, 30, objs))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("c\n")
    return root


def test_voc_splits_come_from_image_sets_and_difficult_objects_are_ignored(ray_local, tmp_path):
    root = _voc_root(tmp_path / "VOC2007")
    train, info, report = read_dataset(root, split="train")
    val, val_info, _ = read_dataset(root, split="val")

    assert detect_source(root) == "voc"
    assert info.kind == "voc" and info.split_method == "source" and info.class_names == VOC_CLASSES
    assert report.num_problems == 0
    rows = _rows(train)
    assert sorted(rows) == [0, 1]  # ids: position among the sorted annotation files a, b, c
    assert [Path(row["path"]).name for row in _rows(val).values()] == ["c.jpg"]
    a = rows[0]
    # 1-based inclusive corners (1, 1, 20, 10) cover [0, 20] x [0, 10] in pixel coordinates.
    np.testing.assert_array_equal(a["boxes"], [[0, 0, 20, 10], [4, 4, 40, 30]])
    assert [info.class_names[k - 1] for k in a["labels"]] == ["dog", "person"]
    np.testing.assert_array_equal(a["ignore"], [False, True])
    assert val_info.num_images == 1 and val_info.num_boxes == 1


def _turned_jpeg(path: Path) -> Path:
    """Stored 40 wide and 30 high with EXIF orientation 6, as a phone held upright saves its
    photo: shown 30 wide and 40 high."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, exif=exif)
    return path


def test_photos_are_read_as_shown_with_their_exif_orientation(ray_local, tmp_path):
    for name in ("shown.jpg", "stored.jpg"):
        _turned_jpeg(tmp_path / "images" / name)
    source = _write_coco(
        tmp_path / "labels.json",
        # Annotated as viewers and labelling tools show the photo (30x40), and as stored (40x30).
        images=[(1, "shown.jpg", 30, 40), (2, "stored.jpg", 40, 30)],
        annotations=[(1, 1, 1, [2, 25, 10, 12], 0), (2, 2, 1, [2, 2, 10, 10], 0)],
        categories=[(1, "cat")],
    )
    dataset, _, report = read_dataset(source, image_root=str(tmp_path / "images"))

    rows = _rows(dataset)
    assert sorted(rows) == [1] and (rows[1]["width"], rows[1]["height"]) == (30, 40)
    np.testing.assert_array_equal(rows[1]["boxes"], [[2, 25, 12, 37]])  # below the stored height: kept whole
    [entry] = report.entries
    assert entry.kind == "size_mismatch" and Path(entry.file).name == "stored.jpg"
    assert "annotates 40x30" in entry.detail and "swapped" in entry.detail and "EXIF" in entry.detail

    folder, _, _ = read_dataset(tmp_path / "images", class_names=["cat"])
    assert {(r["width"], r["height"]) for r in folder.take_all()} == {(30, 40)}


def test_image_folder_gives_rows_without_boxes_at_decoded_size(ray_local, tmp_path):
    _image(tmp_path / "pics" / "x.jpg", width=32, height=24)
    _image(tmp_path / "pics" / "sub" / "y.png", width=16, height=16)
    (tmp_path / "pics" / "notes.txt").write_text("not an image")

    dataset, info, report = read_dataset(tmp_path / "pics", class_names=["cat", "dog"])

    assert detect_source(tmp_path / "pics") == "folder"
    assert info.kind == "folder" and info.class_names == ("cat", "dog") and info.category_ids == (1, 2)
    rows = sorted(dataset.take_all(), key=lambda row: row["path"])
    assert [(Path(r["path"]).name, r["width"], r["height"]) for r in rows] == [
        ("y.png", 16, 16),
        ("x.jpg", 32, 24),
    ]
    assert all(r["boxes"].shape == (0, 4) and r["labels"].shape == (0,) for r in rows)
    assert report.num_problems == 0


def test_voc_defects_are_counted_and_images_without_size_are_checked_at_decoded_size(ray_local, tmp_path):
    root = tmp_path / "VOC"
    (root / "Annotations").mkdir(parents=True)
    xmls = {
        "a": _voc_xml("a", 40, 30, [("dog", 0, 1, 1, 10, 10)]),
        "b": _voc_xml("b", 50, 50, [("dog", 0, 1, 1, 10, 10)]),  # the image is 40x30
        "c": "<annotation><size>",  # cut short
        "d": _voc_xml("d", 40, 30, [("dog", 0, 1, 1, 10, 10)]),  # its JPEG is missing
        # No <size>: boxes are checked against the decoded 40x30 after the image pass.
        "e": _voc_xml("e", 40, 30, [("cat", 0, 31, 21, 45, 35), ("unicorn", 0, 1, 1, 5, 5)])
        .replace("<size><width>40</width><height>30</height><depth>3</depth></size>", "")
        .replace("</annotation>", "<object><name>cat</name></object></annotation>"),  # no bndbox
    }
    for seed, (name, text) in enumerate(xmls.items()):
        (root / "Annotations" / f"{name}.xml").write_text(text)
        if name != "d":
            _image(root / "JPEGImages" / f"{name}.jpg", seed=seed)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\nd\ne\na\nz\n")

    dataset, _, report = read_dataset(root, split="train")

    found = {kind: n for kind, n in report.counts.items() if n}
    assert found == {
        "duplicate_image_id": 1,  # a, listed twice
        "missing_file": 2,  # z.xml, d.jpg
        "unreadable": 1,  # c.xml
        "size_mismatch": 1,  # b
        "unknown_category": 1,  # unicorn
        "invalid_box": 1,  # e's object without a box
        "clipped": 1,  # e's cat reaches past the corner of the decoded image
    }
    assert (report.images_in_source, report.images_kept, report.boxes_kept) == (4, 2, 2)
    rows = {Path(row["path"]).stem: row for row in dataset.take_all()}
    assert sorted(rows) == ["a", "e"]
    assert (rows["e"]["width"], rows["e"]["height"]) == (40, 30)
    np.testing.assert_array_equal(rows["e"]["boxes"], [[30, 20, 40, 30]])


def _defects(root: Path) -> Path:
    """One of each problem, each on its own image or box, next to three good images."""
    for seed, name in enumerate(("good1.jpg", "good2.jpg", "good3.jpg", "dup.jpg")):
        _image(root / "images" / name, seed=seed)
    (root / "images" / "notimage.jpg").write_text("this is text, not a JPEG")
    _truncated_jpeg(root / "images" / "truncated.jpg")
    return _write_coco(
        root / "labels.json",
        images=[
            (1, "good1.jpg", 40, 30),
            (2, "good2.jpg", 40, 30),
            (3, "missing.jpg", 40, 30),
            (4, "notimage.jpg", 40, 30),
            (5, "truncated.jpg", 64, 64),
            (1, "dup.jpg", 40, 30),  # id 1 again
            (6, "good3.jpg", 40, 30),
        ],
        annotations=[
            (10, 1, 1, [2, 2, 10, 10], 0),  # good
            (11, 1, 1, [5, 5, 0, 4], 0),  # zero width
            (12, 1, 1, [50, 50, 10, 10], 0),  # wholly right of and below the 40x30 image
            (13, 2, 2, [30, 20, 20, 20], 0),  # reaches past the corner: clipped to [30, 20, 40, 30]
            (14, 2, 99, [1, 1, 5, 5], 0),  # no category 99
            (15, 6, 2, [0, 0, 8, 8], 0),  # good
        ],
        categories=[(1, "cat"), (2, "dog")],
    )


def test_each_defect_is_counted_once_and_every_good_row_kept(ray_local, tmp_path):
    source = _defects(tmp_path / "data")
    dataset, info, report = read_dataset(source, report_dir=str(tmp_path / "out"))

    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    expected = dict.fromkeys(PROBLEM_KINDS, 0) | {
        "duplicate_image_id": 1,
        "missing_file": 1,
        "unreadable": 1,
        "truncated": 1,
        "zero_area": 1,
        "outside_image": 1,
        "clipped": 1,
        "unknown_category": 1,
    }
    assert saved["counts"] == expected
    assert saved["images"] == {"in_source": 6, "kept": 3}
    assert saved["boxes"] == {"in_source": 6, "kept": 3}
    files = {entry["kind"]: Path(entry["file"]).name for entry in saved["entries"]}
    assert files["missing_file"] == "missing.jpg" and files["unreadable"] == "notimage.jpg"
    assert files["truncated"] == "truncated.jpg" and files["duplicate_image_id"] == "dup.jpg"
    assert files["zero_area"] == "labels.json"  # box problems name the annotation file
    assert "missing_file 1" in report.summary() and "truncated 1" in report.summary()

    rows = _rows(dataset)
    assert sorted(rows) == [1, 2, 6] and info.num_images == 3 and info.num_boxes == 3
    assert Path(rows[1]["path"]).name == "good1.jpg"  # the first entry of a repeated id wins
    np.testing.assert_array_equal(rows[1]["boxes"], [[2, 2, 12, 12]])
    np.testing.assert_array_equal(rows[2]["boxes"], [[30, 20, 40, 30]])
    np.testing.assert_array_equal(rows[2]["labels"], [2])
    np.testing.assert_array_equal(rows[6]["boxes"], [[0, 0, 8, 8]])


def test_strict_mode_stops_at_the_first_problem_naming_the_file(ray_local, tmp_path):
    with pytest.raises(DataValidationError, match=r"dup\.jpg.*duplicate_image_id"):
        read_dataset(_defects(tmp_path / "data"), strict=True)

    # A problem found by the image pass on the workers.
    _image(tmp_path / "clean" / "ok.jpg")
    _truncated_jpeg(tmp_path / "clean" / "cut.jpg")
    source = _write_coco(
        tmp_path / "clean" / "labels.json",
        images=[(1, "ok.jpg", 40, 30), (2, "cut.jpg", 64, 64)],
        annotations=[],
        categories=[(1, "cat")],
    )
    with pytest.raises(DataValidationError, match=r"cut\.jpg.*truncated"):
        read_dataset(source, strict=True, report_dir=str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert saved["strict"] is True and saved["counts"]["truncated"] == 1


def test_detect_source_recognises_each_kind_and_explains_anything_else(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "plain.json").write_text(json.dumps({"images": [], "annotations": []}))
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.md").write_text("# nothing here")

    with pytest.raises(ValueError, match=r"notes\.txt is a \.txt file; expected a COCO annotation file"):
        detect_source(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"not a COCO annotation file: it lacks \['categories'\]"):
        detect_source(tmp_path / "plain.json")
    with pytest.raises(
        ValueError, match=r"stuff is a directory holding readme\.md; expected .*Pascal VOC root"
    ):
        detect_source(tmp_path / "stuff")
    with pytest.raises(ValueError, match="does not exist"):
        detect_source(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="an image folder has no splits"):
        read_dataset(_image(tmp_path / "pics" / "x.jpg").parent, split="train")


def test_seeded_fraction_split_is_disjoint_complete_and_repeatable(ray_local, tmp_path):
    images = [(100 + i, f"{i}.jpg", 8, 8) for i in range(10)]
    for _, name, w, h in images:
        _image(tmp_path / "images" / name, width=w, height=h)
    source = _write_coco(tmp_path / "labels.json", images=images, annotations=[], categories=[(1, "cat")])

    train, _, _ = read_dataset(source, split="train", val_fraction=0.3, seed=3)
    val, val_info, _ = read_dataset(source, split="val", val_fraction=0.3, seed=3)
    again, _, _ = read_dataset(source, split="val", val_fraction=0.3, seed=3)

    train_ids, val_ids = set(_rows(train)), set(_rows(val))
    assert len(val_ids) == 3 and not train_ids & val_ids
    assert train_ids | val_ids == {image_id for image_id, *_ in images}
    assert set(_rows(again)) == val_ids
    assert (val_info.split_method, val_info.val_fraction, val_info.seed) == ("fraction", 0.3, 3)
    # The split depends on the set of ids and the seed, not on their order.
    ids = np.arange(100, 110)
    np.testing.assert_array_equal(
        fraction_split(ids[::-1], "val", 0.3, 3)[::-1], fraction_split(ids, "val", 0.3, 3)
    )
    assert len({tuple(fraction_split(ids, "val", 0.3, seed)) for seed in range(5)}) > 1


def test_dataset_info_round_trips_through_a_plain_dict():
    info = DatasetInfo(
        "coco", "/data/x.json", "val", ("car", "cat"), (3, 17), 10, 25, split_method="fraction"
    )
    plain = info.to_dict()
    assert plain["category_ids"] == [3, 17]
    assert DatasetInfo.from_dict(json.loads(json.dumps(plain))) == info
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        DatasetInfo.from_dict(plain | {"colour": "red"})


def _same_rows(local_rows: list[dict], remote_rows: list[dict], remote_root: str) -> None:
    """The rows of a source read from a bucket are those of its local copy, their paths in the
    bucket."""
    assert len(remote_rows) == len(local_rows) > 0
    for mine, theirs in zip(
        sorted(local_rows, key=lambda r: r["image_id"]), sorted(remote_rows, key=lambda r: r["image_id"])
    ):
        assert theirs["path"].startswith(f"{remote_root}/") and theirs["path"].endswith(
            Path(mine["path"]).name
        )
        assert (theirs["image_id"], theirs["width"], theirs["height"]) == (
            mine["image_id"],
            mine["width"],
            mine["height"],
        )
        np.testing.assert_array_equal(theirs["boxes"], mine["boxes"])
        np.testing.assert_array_equal(theirs["labels"], mine["labels"])


def test_a_voc_root_in_a_bucket_reads_as_its_local_copy(ray_local, bucket, tmp_path):
    """`--data s3://BUCKET/VOC2007` (a real S3 API): the same splits, boxes and labels."""
    from tests.storage import upload_tree

    root = _voc_root(tmp_path / "VOC2007")
    remote = upload_tree(root, f"{bucket}/VOC2007")
    assert detect_source(remote) == "voc"
    for split in ("train", "val"):
        local_rows, remote_rows = (read_dataset(r, split=split)[0].take_all() for r in (root, remote))
        _same_rows(local_rows, remote_rows, remote)

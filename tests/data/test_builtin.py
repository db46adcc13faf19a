"""The built-in dataset: reproducible bytes, valid COCO, the spread of objects the tiny
preset needs, occlusion and crowds, idempotent writes, and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from jobs import data
from pipelines.data.builtin import CATEGORY_IDS, MANIFEST, scene, write_builtin
from ssd import config as C
from ssd.anchors import default_boxes
from ssd.evaluate import category_id_to_label
from ssd.matching import match
from ssd.synthetic import CLASS_NAMES, make_scene

SMALL = {"train_images": 20, "val_images": 5}
SIZE = 160  # the default image side


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("builtin") / "small"
    write_builtin(out, seed=0, **SMALL)
    return out


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes [N, 4] xyxy pixels, labels [N]) of 300 train scenes, drawn as write_builtin draws them."""
    return [scene(0, "train", index, SIZE)[1:] for index in range(300)]


@pytest.fixture(scope="module")
def many_boxes(scenes) -> tuple[np.ndarray, np.ndarray]:
    """All boxes [N, 4] and labels [N] of `scenes`, concatenated."""
    return np.concatenate([b for b, _ in scenes]), np.concatenate([lab for _, lab in scenes])


def test_same_seed_gives_byte_identical_files(small, tmp_path):
    again = tmp_path / "again"
    write_builtin(again, seed=0, **SMALL)
    first, second = _hashes(small), _hashes(again)
    assert len(first) == 20 + 5 + 2 + 3  # images, two JSONs, LICENSE, README, manifest
    assert first == second


def test_scenes_drawn_in_worker_processes_give_the_same_files(small, tmp_path, monkeypatch):
    from pipelines.data import builtin

    monkeypatch.setattr(builtin, "CHUNK", 4)  # several tasks for the two processes
    seen = []
    write_builtin(tmp_path / "par", seed=0, processes=2, progress=lambda *a: seen.append(a), **SMALL)
    assert _hashes(tmp_path / "par") == _hashes(small)
    assert seen[:2] == [("train", 4, 20), ("train", 8, 20)] and seen[-1] == ("val", 5, 5)


def test_a_different_seed_gives_different_images_and_boxes(small, tmp_path):
    other = tmp_path / "other"
    write_builtin(other, seed=1, **SMALL)
    first, second = _hashes(small), _hashes(other)
    images = [k for k in first if k.endswith(".jpg")]
    assert sum(first[k] != second[k] for k in images) == len(images)
    assert first["annotations/instances_train.json"] != second["annotations/instances_train.json"]


def test_val_images_do_not_depend_on_the_number_of_train_images(small, tmp_path):
    fewer = tmp_path / "fewer"
    write_builtin(fewer, seed=0, train_images=7, val_images=5)
    first, second = _hashes(small), _hashes(fewer)
    val = [k for k in first if k.startswith("val/")]
    assert len(val) == 5 and all(first[k] == second[k] for k in val)
    assert first["annotations/instances_val.json"] == second["annotations/instances_val.json"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_json_loads_and_every_box_lies_inside_its_image(small, split):
    coco = COCO(str(small / "annotations" / f"instances_{split}.json"))
    assert len(coco.getImgIds()) == SMALL[f"{split}_images"]
    assert len(coco.getAnnIds()) > 0
    for image in coco.loadImgs(coco.getImgIds()):
        with Image.open(small / split / "images" / image["file_name"]) as jpeg:
            assert jpeg.format == "JPEG" and jpeg.mode == "RGB"
            assert jpeg.size == (image["width"], image["height"]) == (SIZE, SIZE)
            assert "exif" not in jpeg.info and "icc_profile" not in jpeg.info
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann["bbox"]
        image = coco.imgs[ann["image_id"]]
        assert w > 0 and h > 0 and ann["area"] == pytest.approx(w * h)
        assert min(x, y) >= 0 and x + w <= image["width"] and y + h <= image["height"], ann
        assert ann["iscrowd"] == 0 and ann["category_id"] in CATEGORY_IDS


def test_category_ids_are_non_contiguous_and_every_class_appears(small, many_boxes):
    categories = _coco(small, "train")["categories"]
    ids = sorted(c["id"] for c in categories)
    assert ids == sorted(CATEGORY_IDS) and len(ids) == len(CLASS_NAMES) == 5
    assert ids != list(range(1, 6)) and ids != list(range(ids[0], ids[0] + 5))
    assert [c["name"] for c in sorted(categories, key=lambda c: c["id"])] == list(CLASS_NAMES)
    _, labels = many_boxes
    counts = np.bincount(labels, minlength=6)[1:]
    assert counts.min() > 0.15 * len(labels)  # ~20 % each: no class is rare


def test_objects_span_tiny_to_large_and_tall_to_wide(many_boxes):
    boxes, _ = many_boxes
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    size = np.sqrt(w * h) / SIZE  # fraction of the image side
    aspect = w / h
    assert size.min() < 0.1 and size.max() > 0.75
    assert (size < 0.15).mean() > 0.2 and (size > 0.4).mean() > 0.05
    assert aspect.min() < 0.4 and aspect.max() > 2.5
    assert (aspect < 0.5).mean() > 0.1 and (aspect > 2.0).mean() > 0.1
    assert np.minimum(w, h).min() >= 0.05 * SIZE - 1  # MIN_SIDE_FRACTION, up to rounding


def test_every_feature_map_and_default_box_shape_of_tiny_gets_positives(many_boxes):
    cfg = C.preset("tiny")
    anchors = default_boxes(cfg)  # [A, 4] cxcywh in [0, 1]
    # Which (feature map, shape) each default box is, in the layout of ssd.anchors.
    shape_ids = [
        (k, s)
        for k, (f, n) in enumerate(zip(cfg.anchors.feature_maps, cfg.anchors.boxes_per_location()))
        for _ in range(f * f)
        for s in range(n)
    ]
    boxes, _ = many_boxes
    matched = match(torch.from_numpy(boxes / SIZE), anchors, cfg.train.iou_threshold)  # [A]
    used = {shape_ids[a] for a in torch.nonzero(matched >= 0).flatten().tolist()}
    assert used == set(shape_ids)  # 5 maps, 4 or 6 shapes each: 24 (map, shape) pairs


def test_scenes_hold_occlusion_and_crowds(scenes):
    counts = np.array([len(b) for b, _ in scenes])
    assert counts.max() >= 16 and (counts >= 12).mean() > 0.05  # crowd scenes
    overlapping = 0
    for b, _ in scenes:
        t = torch.from_numpy(b)
        lt = torch.max(t[:, None, :2], t[None, :, :2])  # [N, N, 2]
        rb = torch.min(t[:, None, 2:], t[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1).fill_diagonal_(0)  # [N, N]
        area = (t[:, 2:] - t[:, :2]).prod(-1)  # [N]
        overlapping += int(bool((inter / torch.min(area[:, None], area[None, :]) > 0.25).any()))
    assert overlapping > 0.3 * len(scenes)


def test_json_boxes_and_category_ids_round_trip_to_the_generator(small):
    coco = _coco(small, "val")
    to_label = category_id_to_label(coco)  # ssd.evaluate's rule: k-th id in sorted order
    for image in coco["images"]:
        _, boxes, labels = scene(0, "val", image["id"] - 1, SIZE)
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        np.testing.assert_array_equal(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), boxes)
        assert [to_label[a["category_id"]] for a in anns] == labels.tolist()


def test_a_mostly_hidden_object_loses_its_box():
    dropped = 0
    for seed in range(40):
        image, boxes, labels = make_scene(np.random.default_rng(seed), 96, 96, 8)
        same, every_box, _ = make_scene(np.random.default_rng(seed), 96, 96, 8, min_visible=0.0)
        np.testing.assert_array_equal(image, same)  # the rule changes boxes, never pixels
        assert boxes.shape == (len(labels), 4) and boxes.dtype == np.float32 and labels.dtype == np.int64
        kept = {tuple(b) for b in boxes.tolist()}
        assert kept <= {tuple(b) for b in every_box.tolist()}
        dropped += len(every_box) - len(boxes)
    assert dropped > 0


def test_make_scene_is_a_function_of_the_generator():
    a = make_scene(np.random.default_rng(7), 64, 80, 4)
    b = make_scene(np.random.default_rng(7), 64, 80, 4)
    assert a[0].shape == (64, 80, 3) and a[0].dtype == np.uint8
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_rerunning_with_the_same_parameters_skips(small):
    before = {p: p.stat().st_mtime_ns for p in small.rglob("*") if p.is_file()}
    summary = write_builtin(small, seed=0, **SMALL)
    assert summary["skipped"] is True
    assert summary["splits"]["train"]["images"] == 20 and summary["splits"]["val"]["images"] == 5
    assert {p: p.stat().st_mtime_ns for p in small.rglob("*") if p.is_file()} == before


def test_other_parameters_or_a_damaged_file_rewrite_the_dataset(tmp_path):
    out = tmp_path / "ds"
    write_builtin(out, seed=0, **SMALL)
    summary = write_builtin(out, seed=0, train_images=8, val_images=5)
    assert summary["skipped"] is False
    assert len(list((out / "train" / "images").glob("*.jpg"))) == 8  # no stale images left
    (out / "val" / "images" / "000001.jpg").write_bytes(b"not a jpeg")
    assert write_builtin(out, seed=0, train_images=8, val_images=5)["skipped"] is False
    assert json.loads((out / MANIFEST).read_text())["params"]["train_images"] == 8


def test_refuses_a_non_empty_directory_that_is_not_a_builtin_dataset(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a built-in dataset"):
        write_builtin(out, **SMALL)
    assert sorted(os.listdir(out)) == ["notes.txt"]
    write_builtin(out, overwrite=True, **SMALL)
    assert (out / "notes.txt").read_text() == "keep me" and (out / MANIFEST).is_file()


def test_bad_counts_are_errors_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="train_images"):
        write_builtin(tmp_path / "x", train_images=0)


def test_licence_and_readme_describe_the_data(small):
    assert "CC0" in (small / "LICENSE.txt").read_text()
    readme = (small / "README.md").read_text()
    for needle in ("Seed 0", "| train | 20 |", "| val | 5 |", *CLASS_NAMES, "file_name"):
        assert needle in readme


def test_cli_writes_then_skips(tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "jobs.data", "builtin", "--out", str(out)]
    command += ["--train-images", "4", "--val-images", "2", "--seed", "3"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert re.search(r"train +4 images", first.stdout) and len(list(out.glob("*/images/*.jpg"))) == 6
    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "nothing written" in second.stdout


def test_cli_refusal_is_a_one_line_error(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    command = [sys.executable, "-m", "jobs.data", "builtin", "--out", str(tmp_path), "--train-images", "2"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a built-in dataset" in out.stderr and "Traceback" not in out.stderr


def test_register_adds_data_builtin_to_a_rayssd_style_parser(tmp_path):
    parser = argparse.ArgumentParser(prog="rayssd")
    data.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "builtin", "--out", str(tmp_path / "ds"), "--train-images", "3"])
    assert (args.command, args.data_command, args.train_images, args.val_images) == (
        "data",
        "builtin",
        3,
        500,
    )
    args.val_images = 2
    assert args.func(args) == 0
    assert len(list((tmp_path / "ds").glob("*/images/*.jpg"))) == 5

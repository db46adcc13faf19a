import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.builtin import write_builtin
from pipelines.prepare import prepare, sample_hash, with_classes
from ssd import config as C
from ssd.anchors import default_boxes
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
    table = pq.read_table(str(tmp_path / "p" / "all")).to_pandas()
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
        np.testing.assert_allclose(
            np.stack(row["loc_targets"]) if row["loc_targets"].dtype == object else row["loc_targets"],
            loc_t.numpy(),
            atol=1e-5,
        )


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

"""`rayssd evaluate` end to end on a real local Ray: a briefly trained tiny model, detected on
Ray Data actors, scores exactly what the same model scores when called directly here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.builtin import write_builtin
from pipelines.label.batch import BatchDetector, evaluate_dataset
from ssd import config as C
from ssd.config import with_classes
from ssd.model import build_ssd
from tests.trained_tiny import BATCH, classes, direct_metrics, save, split, train_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("builtin")
    write_builtin(root, seed=0, train_images=64, val_images=24, image_size=160)
    return root


@pytest.fixture(scope="module")
def trained(builtin, tmp_path_factory) -> str:
    return train_tiny(builtin, tmp_path_factory.mktemp("trained"))


def test_ray_evaluation_equals_the_detector_called_directly(ray_local, builtin, trained):
    val = str(builtin / "annotations" / "instances_val.json")
    got = evaluate_dataset(val, trained, split=None, batch_size=BATCH, workers=(1, 1))
    expected = direct_metrics(trained, builtin)

    assert got["images"] == 24 and got["uri"] == trained
    assert got["map50"] > 0  # some detections match: the comparison below is not 0 == 0
    for key in ("map", "map50", "map75", "mar_100"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    assert got["per_class50"].keys() == expected["per_class50"].keys()
    for name, ap in expected["per_class50"].items():
        assert got["per_class50"][name] == pytest.approx(ap, abs=1e-6), name
    assert got["images_per_s"] > 0 and got["detections"] > 0


def test_batch_detector_gives_a_row_per_image_even_with_no_detection(trained, builtin):
    coco, images, sizes = split(builtin, "val")
    batch = {
        "image_id": np.array([im["id"] for im in coco["images"][:3]]),
        "height": np.array([h for h, _ in sizes[:3]]),
        "width": np.array([w for _, w in sizes[:3]]),
        "image": images[:3],
    }
    some = BatchDetector(trained, max_detections=5)(batch)
    assert [len(b) for b in some["boxes"]] == [5, 5, 5]
    assert all(b.dtype == np.float32 and b.shape == (5, 4) for b in some["boxes"])
    none = BatchDetector(trained, score_threshold=1.0)(batch)  # softmax never exceeds 1
    assert np.array_equal(none["image_id"], batch["image_id"])
    assert [b.shape for b in none["boxes"]] == [(0, 4)] * 3
    assert [s.shape for s in none["scores"]] == [(0,)] * 3 and [lab.shape for lab in none["labels"]] == [
        (0,)
    ] * 3


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", *args], capture_output=True, text=True, timeout=300
    )


def test_evaluate_cli_prints_map_and_writes_json_into_a_bucket(ray_local, builtin, trained, bucket):
    from pipelines.data.sources import resolve_location

    val = str(builtin / "annotations" / "instances_val.json")
    out = f"{bucket}/eval/metrics.json"  # --out s3://...
    run = _cli(
        *("--model", trained, "--data", val, "--split", "all", "--batch-size", str(BATCH)),
        *("--workers", "1", "--out", str(out), "--address", "auto"),  # the session's Ray
    )
    assert run.returncode == 0, run.stderr
    assert "mAP@0.5 " in run.stdout and "24 images" in run.stdout
    metrics = json.loads(resolve_location(out).read_text())
    expected = direct_metrics(trained, builtin)
    assert metrics["map50"] == pytest.approx(expected["map50"], abs=1e-6)
    assert metrics["images"] == 24 and set(metrics["per_class50"]) == set(expected["per_class50"])
    assert f"{expected['map50']:7.4f}" in run.stdout
    assert metrics["voc07_map50"] == pytest.approx(expected["voc07_map50"], abs=1e-6)  # VOC AP beside COCO's
    assert f"VOC07 mAP@0.5    {expected['voc07_map50']:7.4f}" in run.stdout and "VOC mAP@0.5" in run.stdout


def _one_line_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("evaluate: error: "), run.stderr
    return errors[0]


def test_a_model_trained_on_other_classes_is_refused_naming_both(ray_local, builtin, tmp_path):
    coco = json.loads((builtin / "annotations" / "instances_val.json").read_text())
    dataset = classes(coco)
    dataset["class_names"] = dataset["class_names"][::-1]
    cfg = with_classes(C.preset("tiny"), tuple(dataset["class_names"]))
    other = save(build_ssd(cfg), cfg, dataset, tmp_path / "other")
    val = str(builtin / "annotations" / "instances_val.json")
    error = _one_line_error(_cli("--model", other, "--data", val, "--split", "all", "--address", "auto"))
    assert str(dataset["class_names"]) in error and str(dataset["class_names"][::-1]) in error


def test_a_missing_model_file_is_a_one_line_error(builtin, tmp_path):
    val = str(builtin / "annotations" / "instances_val.json")
    error = _one_line_error(_cli("--model", str(tmp_path / "nothing" / "checkpoint.pt"), "--data", val))
    assert "nothing" in error


def test_a_bad_data_source_is_a_one_line_error(trained, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    error = _one_line_error(_cli("--model", trained, "--data", str(tmp_path / "notes.txt")))
    assert "notes.txt" in error

"""Does a preset fit the data it trains on? `rayssd train --sanity` on real objects, and its diagnosis.

The set is `benchmarks.realobjects`: real objects (faces, coins, a cat, a cup, a rocket ...)
cut out of photographs scikit-image ships, pasted at 10-70 px onto real photographs, ten
classes with COCO-style gaps in their ids: data the project was not tuned on.
"""

from __future__ import annotations

import argparse

import pytest

from benchmarks.realobjects import OBJECT_IDS, compose
from jobs import train as train_job
from pipelines.train.sanity import (
    FIT_GOAL,
    SANITY_EPOCHS,
    SANITY_STEPS,
    anchor_coverage,
    coverage_hint,
    fit_lines,
    repeats,
    sanity_lines,
)
from ssd import config as C


def _ground_truth(boxes: list[list[float]], size: int = 100) -> dict:
    return {
        "images": [{"id": 1, "width": size, "height": size}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": box, "iscrowd": 0}
            for i, box in enumerate(boxes)
        ],
    }


def test_anchor_coverage_tells_boxes_the_default_boxes_fit_from_boxes_they_miss():
    cfg = C.preset("tiny")  # first map 16x16, s_min 0.1: a default box 12.8 px wide at (4, 4) px
    step = 128 / 16
    on_a_default_box = [0.5 * step - 6.4, 0.5 * step - 6.4, 12.8, 12.8]
    fits = anchor_coverage(_ground_truth([on_a_default_box], size=128), cfg)
    assert fits["poor"] == 0.0 and fits["median_iou"] == pytest.approx(1.0, abs=1e-5)
    assert coverage_hint(fits) is None
    tiny_boxes = [[10 + 12 * k, 40, 3, 3] for k in range(5)]  # 3 px: IoU <= 9 / 164 with any box
    missed = anchor_coverage(_ground_truth(tiny_boxes, size=128), cfg)
    assert missed["poor"] == 1.0 and missed["smallest_default"] == pytest.approx(0.1)
    hint = coverage_hint(missed)
    assert "100% of the boxes" in hint and "lower anchors.min_scale" in hint


def test_a_sanity_run_takes_its_steps_and_its_verdicts_say_what_to_do():
    # 150 steps of 2 x 8 images over 5 epochs of 64 images: each epoch repeats them 8 times
    assert repeats(64, 2, 8) == 8 and SANITY_STEPS * 2 * 8 <= 5 * 8 * 64
    assert repeats(10_000, 2, 8) == 1
    coverage = {"poor": 0.4, "median_scale": 0.1, "smallest_default": 0.2, "median_iou": 0.4}
    passed, lines = sanity_lines({"fit_map50": 0.95, "loss": 1.0}, 64, coverage)
    assert passed and "sanity check passed" in lines[0]
    failed, lines = sanity_lines({"fit_map50": 0.2, "loss": 6.0}, 64, coverage)
    assert not failed and "FAILED" in lines[0] and any("anchors.min_scale" in line for line in lines)
    assert (
        fit_lines({"fit_map50": 0.95, "map50": 0.3}, 128, coverage)[1]
        .strip()
        .startswith("but val mAP@0.5 is 0.300: it memorises")
    )
    assert "does not fit its training data yet" in fit_lines({"fit_map50": 0.4}, 128, coverage)[0]
    assert fit_lines({"map50": 0.5}, 0, None) == []  # not scored: nothing said


def test_a_sanity_check_refuses_what_it_cannot_check_before_ray_starts(tmp_path):
    annotations = compose(tmp_path / "objects", "objects", count=4, seed=0, split="train")
    parser = argparse.ArgumentParser()
    train_job.add_arguments(parser)
    base = ["--data", str(annotations), "--preset", "tiny", "--sanity", "--storage", str(tmp_path / "runs")]
    for extra, needle in (
        (["--val-data", str(annotations)], "drop --val-data"),
        (["--set", "train.steps=10"], "drop train.steps"),
        (["--resume", "--name", "x"], "a new run"),
    ):
        with pytest.raises(ValueError, match=needle):
            train_job.plan(parser.parse_args(base + extra))
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_tiny_fits_64_real_object_photos_through_rayssd_train_sanity(
    ray_local, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # 80 images: the seeded val fraction (0.1) of the source stays out of its train split
    annotations = compose(tmp_path / "objects", "objects", count=80, seed=0, split="train")
    parser = argparse.ArgumentParser()
    train_job.add_arguments(parser)
    args = parser.parse_args(
        [
            "--data", str(annotations), "--preset", "tiny", "--sanity", "64",
            "--storage", str(tmp_path / "runs"), "--quiet", "--set", "train.batch_size=8",
        ]
    )  # fmt: skip
    out = train_job.run(args)
    printed = capsys.readouterr().out
    assert isinstance(out, dict), printed  # 1 would be a failed check
    assert out["num_fit"] == 64 and out["registered"] is None  # a check, not a model to serve
    assert out["epochs_done"] == SANITY_EPOCHS
    assert out["metrics"]["fit_map50"] >= FIT_GOAL, printed
    assert "sanity check passed" in printed
    # it ran on the data's own classes (ids with gaps) and trained the steps it promised
    from ssd import checkpoint as ckpt_io

    state = ckpt_io.load(out["checkpoint"])
    assert list(state["dataset"]["category_ids"]) == list(OBJECT_IDS)
    assert state["step"] >= SANITY_STEPS

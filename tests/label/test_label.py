"""`rayssd label` on a real local Ray: every readable image gets a row, every bad file is listed,
the detections are exactly the model's own, and the run lands in a real MLflow server with the
registered model version it used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from pycocotools.coco import COCO

from jobs import label
from pipelines.data.builtin import write_builtin
from pipelines.data.samples import read_image
from pipelines.label.batch import decode_batch, label_source, label_table
from pipelines.label.launch import LabelOptions
from pipelines.label.launch import label as launch_label
from pipelines.label.outputs import LABEL_SCHEMA
from pipelines.track.models import load_model
from pipelines.track.registry import log_model
from pipelines.track.tracker import Tracker
from ssd import checkpoint, export
from ssd.detector import Detector
from ssd.transforms import eval_transform
from tests.storage import upload_tree
from tests.trained_tiny import BATCH, direct_metrics, train_tiny

pytestmark = pytest.mark.slow

GOOD = 9  # readable images in the folder, 4 of them in a subfolder
REGISTERED = "rayssd-label-test"


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("builtin")
    write_builtin(root, seed=0, train_images=64, val_images=16, image_size=160)
    return root


@pytest.fixture(scope="module")
def trained(builtin, tmp_path_factory) -> str:
    return train_tiny(builtin, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def folder(builtin, tmp_path_factory) -> Path:
    """GOOD images (some in sub/), a truncated JPEG, a text file named .png and a notes.txt."""
    root = tmp_path_factory.mktemp("folder")
    (root / "sub").mkdir()
    sources = sorted((builtin / "val" / "images").glob("*.jpg"))
    for i, path in enumerate(sources[:GOOD]):
        shutil.copy(path, root / ("sub" if i % 2 else ".") / path.name)
    data = sources[GOOD].read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "fake.png").write_text("this is not a picture")
    (root / "notes.txt").write_text("hello")
    return root


def _direct(model_path: str, paths: list[str], batch: int) -> dict[str, dict[str, np.ndarray]]:
    """The oracle: each image decoded, resized and detected here, one at a time, on one torch
    thread with the weight layout `ssd.layout` chose for a one-CPU labelling actor of this
    `batch` (the session's layout cache is shared); path -> boxes, scores, labels."""
    loaded = load_model(model_path)
    size = loaded.cfg.model.image_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        detector = Detector(loaded.model, loaded.cfg, channels_last=None, batch=batch)
        for path in paths:
            pixels = read_image(path)
            resized, _ = eval_transform(pixels, np.zeros((0, 4), np.float32), size)
            image = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))[None]
            (found,) = detector(image, [pixels.shape[:2]])
            out[path] = {key: value.numpy() for key, value in found.items()}
    finally:
        torch.set_num_threads(threads)
    return out


def _assert_same_detections(row: dict, want: dict[str, np.ndarray], cfg, score_atol: float) -> None:
    """`row`'s detections are `want`'s: one to one with the same label, score within
    `score_atol` and box within 1e-3 of the image size. Two backends' rounding may reorder
    detections whose scores are that close, and may keep or drop one that close to the score
    threshold or, in a full list, to the lowest score kept; nothing else may differ."""
    boxes = np.array(row["boxes"], np.float64).reshape(-1, 4)
    scores, labels = np.array(row["scores"], np.float64), np.array(row["labels"])
    box_atol = 1e-3 * max(row["width"], row["height"])
    inference = cfg.inference

    def at_edge(score: float, all_scores: np.ndarray) -> bool:
        lowest = all_scores.min() if len(all_scores) == inference.max_detections else -1.0
        return score - inference.score_threshold <= score_atol or score - lowest <= score_atol

    unmatched = set(range(len(scores)))
    for box, score, cls in zip(want["boxes"], want["scores"], want["labels"]):
        same = [
            j
            for j in sorted(unmatched)
            if labels[j] == cls
            and abs(scores[j] - score) <= score_atol
            and np.abs(boxes[j] - box).max() <= box_atol
        ]
        if same:
            unmatched.remove(same[0])
        else:
            assert at_edge(float(score), want["scores"]), (row["path"], "missing", cls, score, box)
    for j in unmatched:
        assert at_edge(scores[j], scores), (row["path"], "extra", labels[j], scores[j], boxes[j])


def test_label_rows_are_plain_list_columns_whatever_the_detection_counts(builtin):
    """`decode_batch` then `label_table` on a hand-made batch, no cluster: equal counts (2, 2)
    stay list columns (Ray would make them a fixed-shape tensor), and labels name categories."""
    paths = sorted(str(p) for p in (builtin / "val" / "images").glob("*.jpg"))[:3]
    rows = {"image_id": np.array([7, 8, 9]), "path": np.array(paths, dtype=object)}
    rows.update(width=np.array([160] * 3), height=np.array([160] * 3))
    decoded = decode_batch(rows, image_size=128)
    assert decoded["image"].shape == (3, 3, 128, 128) and decoded["image"].dtype == np.uint8
    detections = {key: decoded[key] for key in ("image_id", "width", "height")}
    detections["boxes"] = [np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32), np.ones((2, 4)) * 3]
    detections["scores"] = [np.array([0.9, 0.5]), np.zeros(0), np.array([0.8, 0.2])]
    detections["labels"] = [np.array([1, 2]), np.zeros(0, np.int64), np.array([2, 2])]
    table = label_table(detections, decoded["path"], ["circle", "square"], [11, 40])
    assert table.schema == LABEL_SCHEMA and table.column("path").to_pylist() == paths
    assert table.column("boxes").to_pylist() == [[[1.0] * 4] * 2, [], [[3.0] * 4] * 2]
    assert table.column("category_ids").to_pylist() == [[11, 40], [], [40, 40]]
    assert table.column("category_names").to_pylist() == [["circle", "square"], [], ["square"] * 2]
    assert table.column("scores").to_pylist()[0] == pytest.approx([0.9, 0.5])


def test_labelling_a_folder_gives_the_models_own_detections_and_lists_bad_files(
    ray_local, folder, trained, tmp_path
):
    out = tmp_path / "out"
    summary = label_source(str(folder), load_model(trained), str(out), batch_size=1, workers=2)

    table = pq.read_table(out / "labels")  # plain pyarrow: no Ray extension types
    assert table.schema.remove_metadata() == LABEL_SCHEMA
    rows = sorted(table.to_pylist(), key=lambda row: row["image_id"])
    good = sorted(str(p) for p in folder.rglob("*.jpg") if p.name != "cut.jpg")
    assert sorted(row["path"] for row in rows) == good and len(good) == GOOD
    assert summary["images"] == GOOD and summary["errors"] == 2 and summary["skipped"] == 1

    errors = {Path(e["path"]).name: e["kind"] for e in json.loads((out / "errors.json").read_text())}
    assert errors == {"cut.jpg": "truncated", "fake.png": "unreadable", "notes.txt": "not_an_image"}

    expected = _direct(trained, good, batch=1)
    assert sum(len(e["scores"]) for e in expected.values()) > GOOD  # not a comparison of empties
    for row in rows:
        want = expected[row["path"]]
        assert np.array_equal(np.array(row["boxes"], np.float32).reshape(-1, 4), want["boxes"]), row["path"]
        assert np.array_equal(np.array(row["scores"], np.float32), want["scores"]), row["path"]
        assert row["labels"] == want["labels"].tolist(), row["path"]
        with Image.open(row["path"]) as image:
            assert (row["width"], row["height"]) == image.size
    names = json.loads((out / "images.json").read_text())["categories"]
    name_of = {c["id"]: c["name"] for c in names}
    assert all([name_of[c] for c in row["category_ids"]] == row["category_names"] for row in rows)

    coco = COCO(str(out / "images.json"))  # image id -> path, and the model's categories
    results = coco.loadRes(str(out / "detections.json"))
    assert len(results.anns) == summary["detections"] == sum(len(row["scores"]) for row in rows)
    assert {coco.imgs[i]["file_name"] for i in results.getImgIds()} <= set(good)
    first = max(rows, key=lambda row: len(row["scores"]))
    best = max(results.loadAnns(results.getAnnIds(imgIds=[first["image_id"]])), key=lambda a: a["score"])
    x0, y0, x1, y1 = first["boxes"][0]
    assert best["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-4)
    assert best["score"] == pytest.approx(first["scores"][0], abs=1e-6)
    with Image.open(out / "samples.jpg") as grid:
        assert grid.format == "JPEG" and grid.width > 0


def test_evaluate_scores_what_it_labelled_and_overwrite_keeps_other_files(
    ray_local, builtin, trained, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "detections.json").write_text("stale")
    (out / "mine.txt").write_text("not rayssd's")
    val = str(builtin / "annotations" / "instances_val.json")
    with pytest.raises(ValueError, match="--overwrite"):
        label_source(val, load_model(trained), str(out))

    summary = label_source(
        val, load_model(trained), str(out), evaluate=True, overwrite=True, batch_size=BATCH, workers=2
    )

    expected = direct_metrics(trained, builtin)
    assert summary["images"] == 16 and summary["metrics"]["map50"] > 0
    for key in ("map", "map50", "map75"):
        assert summary["metrics"][key] == pytest.approx(expected[key], abs=1e-6), key
    assert (out / "mine.txt").read_text() == "not rayssd's"
    assert len(json.loads((out / "detections.json").read_text())) == summary["detections"]
    ids = {im["id"] for im in json.loads(Path(val).read_text())["images"]}
    assert {im["id"] for im in json.loads((out / "images.json").read_text())["images"]} == ids


def test_the_cli_refuses_an_existing_output_and_a_folder_to_evaluate_before_ray_starts(
    folder, trained, tmp_path, capsys
):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text("{}")
    calls = [
        ("--model", trained, "--input", str(folder), "--out", str(tmp_path / "out")),
        ("--model", trained, "--input", str(folder), "--out", str(tmp_path / "new"), "--evaluate"),
        ("--model", trained, "--input", str(folder), "--out", str(tmp_path / "new"), "--min-score", "0.3"),
    ]
    for argv, needle in zip(calls, ("--overwrite", "ground truth", "pass --format too")):
        with pytest.raises(SystemExit) as exit_info:
            label.main(list(argv))
        assert exit_info.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].startswith("label: error: ") and needle in errors[0], errors
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "out" / "summary.json").read_text() == "{}"


def test_a_registered_model_by_alias_labels_and_the_run_records_its_version(
    ray_local, mlflow_server, folder, trained, tmp_path
):
    tracker = Tracker.start(uri=mlflow_server, experiment="label-test-training", run_name="register")
    registered = log_model(tracker, trained, register_as=REGISTERED)
    tracker.end()
    assert registered is not None and registered.champion
    options = LabelOptions(  # the stage, called as `rayssd label` calls it, without argparse
        model=f"models:/{REGISTERED}@champion",
        input=str(folder),
        out=str(tmp_path / "out"),
        tracking_uri=mlflow_server,
        workers=1,
        experiment="label-test",
        run_name="label-by-alias",
    )
    summary = launch_label(options)

    assert summary["model"]["version"] == registered.version and summary["images"] == GOOD
    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("label-test").experiment_id], "attributes.run_name = 'label-by-alias'"
    )
    assert run.info.run_id == summary["mlflow_run"]["run_id"] and run.info.status == "FINISHED"
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (
        written["mlflow_run"]["run_id"] == run.info.run_id
        and written["model"]["version"] == registered.version
    )
    assert run.data.params["model.version"] == registered.version
    assert run.data.params["model.name"] == REGISTERED
    assert run.data.tags["rayssd.model_version"] == f"{REGISTERED}/{registered.version}"
    assert run.data.metrics["images"] == GOOD and run.data.metrics["errors"] == 2
    assert run.data.metrics["images_per_s"] > 0
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "label")}
    assert {"label/samples.jpg", "label/summary.json", "label/errors.json"} <= artifacts
    version = client.get_model_version(REGISTERED, registered.version)
    inputs = client.get_run(run.info.run_id).inputs.model_inputs
    assert [f"models:/{m.model_id}" for m in inputs] == [version.source]


def test_a_folder_in_a_bucket_is_labelled_into_a_bucket_by_a_model_in_a_bucket(
    ray_local, folder, trained, bucket, tmp_path, capsys
):
    """`rayssd label --model s3://... --input s3://... --out s3://...` on a real S3 API: the
    model's own detections for every image, the bad files listed by URI, nothing local."""
    from pipelines.data.sources import resolve_location

    photos = upload_tree(folder, f"{bucket}/photos")
    model = upload_tree(Path(trained).parent, f"{bucket}/model")
    out = f"{bucket}/labelled"
    argv = ["--model", model, "--input", photos, "--out", out, "--no-tracking", "--batch-size", "4"]
    with pytest.raises(SystemExit) as exit_info:
        label.main([*argv, "--workers", "1"])
    assert exit_info.value.code == 0, capsys.readouterr()
    rows = pq.read_table(f"{out}/labels").to_pylist()
    local = {row["path"]: str(folder / row["path"].removeprefix(f"{photos}/")) for row in rows}
    assert sorted(local.values()) == sorted(str(p) for p in folder.rglob("*.jpg") if p.name != "cut.jpg")
    expected = _direct(trained, list(local.values()), batch=4)
    assert sum(len(e["scores"]) for e in expected.values()) > GOOD
    cfg = load_model(trained).cfg
    for row in rows:
        _assert_same_detections(row, expected[local[row["path"]]], cfg, score_atol=1e-5)
    summary = json.loads(resolve_location(f"{out}/summary.json").read_text())
    assert summary["model"]["loaded_as"] == model  # each node fetches it: no driver-local path
    errors = json.loads(resolve_location(f"{out}/errors.json").read_text())
    assert {e["path"]: e["kind"] for e in errors} == {
        f"{photos}/cut.jpg": "truncated",
        f"{photos}/fake.png": "unreadable",
        f"{photos}/notes.txt": "not_an_image",
    }


def test_an_onnx_export_labels_the_folder_as_the_torch_model_does(ray_local, folder, trained, tmp_path):
    """`rayssd label --model FILE.onnx`: ONNX Runtime actors give the torch detections (one to
    one: same labels, boxes within 1e-3 of the image size, scores within 1e-5)."""
    ckpt = checkpoint.load(trained)
    model, cfg = checkpoint.build_model(ckpt)
    onnx_file = tmp_path / "model.onnx"
    export.export(model, cfg, ckpt["dataset"], onnx_file)
    loaded = load_model(str(onnx_file))
    summary = label_source(str(folder), loaded, str(tmp_path / "out"), batch_size=4, workers=1)
    assert summary["images"] == GOOD and summary["model"]["loaded_as"] == str(onnx_file)
    rows = pq.read_table(tmp_path / "out" / "labels").to_pylist()
    expected = _direct(trained, [row["path"] for row in rows], batch=4)
    assert sum(len(e["scores"]) for e in expected.values()) > GOOD
    for row in rows:
        _assert_same_detections(row, expected[row["path"]], cfg, score_atol=1e-5)


def test_labels_become_coco_and_yolo_datasets_that_read_back_as_the_detections(
    ray_local, builtin, trained, tmp_path, capsys
):
    """`rayssd label --format coco-dataset --format yolo --min-score S`: both datasets hold a
    copy of every image and exactly the detections scoring at least S; pycocotools and rayssd's
    own COCO and YOLO readers (those of `rayssd train`) read them back without a problem. Of
    two images with one name stem in a folder, YOLO keeps the first and names the other."""
    from pipelines.data.datasets import read_dataset

    source = tmp_path / "photos"
    (source / "sub").mkdir(parents=True)
    jpgs = sorted((builtin / "val" / "images").glob("*.jpg"))[:4]
    for i, path in enumerate(jpgs):
        shutil.copy(path, source / ("sub" if i % 2 else ".") / path.name)
    with Image.open(jpgs[2]) as image:  # x.png beside x.jpg
        image.convert("RGB").resize((120, 90)).save(source / jpgs[0].with_suffix(".png").name)
    twin = str(source / jpgs[0].with_suffix(".png").name)
    # S halfway between the model's 6th and 7th best scores here (a briefly trained model's
    # scores differ between CPUs): a few detections kept, the rest cut.
    scores = []
    for found in _direct(trained, [str(p) for p in source.rglob("*.*")], batch=4).values():
        boxes = found["boxes"]
        scores += found["scores"][(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])].tolist()
    best = sorted(scores, reverse=True)
    min_score = float(np.float32((best[5] + best[6]) / 2))
    out = tmp_path / "out"
    argv = ["--model", trained, "--input", str(source), "--out", str(out), "--no-tracking"]
    with pytest.raises(SystemExit) as exit_info:
        label.main([*argv, "--format", "coco-dataset", "--format", "yolo", "--min-score", repr(min_score)])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "coco-dataset: 5 images" in printed and "yolo: 4 images" in printed, printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["datasets"]["yolo"]["left_out"] == [twin]

    rows = {row["path"]: row for row in pq.read_table(out / "labels").to_pylist()}
    expected = {}
    for path, row in rows.items():
        boxes = np.array(row["boxes"], np.float32).reshape(-1, 4)
        flat = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])  # clipped to an edge: no box
        keep = (np.array(row["scores"], np.float32) >= min_score) & ~flat
        boxes = boxes[keep]
        expected[path] = (boxes, np.array(row["labels"])[keep], np.array(row["scores"], np.float32)[keep])
    assert sum(len(e[1]) for e in expected.values()) >= 5  # not a comparison of empties
    assert any(len(row["scores"]) > len(expected[path][1]) for path, row in rows.items())  # S cut some
    relative = {path: str(Path(path).relative_to(source)) for path in rows}

    coco_file = out / "coco-dataset" / "annotations" / "instances_default.json"
    coco = COCO(str(coco_file))
    assert sorted(im["file_name"] for im in coco.dataset["images"]) == sorted(relative.values())
    class_names = checkpoint.load(trained)["dataset"]["class_names"]
    assert [c["name"] for c in coco.dataset["categories"]] == list(class_names)
    for path, (boxes, _, scores) in expected.items():
        [image_id] = [im["id"] for im in coco.dataset["images"] if im["file_name"] == relative[path]]
        assert image_id == rows[path]["image_id"]
        copied = out / "coco-dataset" / "images" / relative[path]
        assert copied.read_bytes() == Path(path).read_bytes()
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: -a["score"])
        assert [a["score"] for a in anns] == pytest.approx(scores.tolist(), abs=1e-5)
        xywh = np.array([a["bbox"] for a in anns]).reshape(-1, 4)
        np.testing.assert_allclose(xywh[:, :2], boxes[:, :2], atol=0.01)
        np.testing.assert_allclose(xywh[:, :2] + xywh[:, 2:], boxes[:, 2:], atol=0.02)

    yaml_file = out / "yolo-dataset" / "data.yaml"
    assert "path" not in yaml.safe_load(yaml_file.read_text())
    assert not (out / "yolo-dataset" / "images" / relative[twin]).exists()
    for source_file, fmt in ((coco_file, "coco-dataset"), (yaml_file, "yolo")):
        ds, _, report = read_dataset(str(source_file))
        assert not report.entries, (fmt, report.entries[:3])
        images = out / f"{fmt.removesuffix('-dataset')}-dataset" / "images"
        back = {str(Path(r["path"]).relative_to(images)): r for r in ds.take_all()}
        want = {relative[p]: e for p, e in expected.items() if not (fmt == "yolo" and p == twin)}
        assert set(back) == set(want), fmt
        for name, (boxes, labels, _) in want.items():
            order = np.lexsort(boxes.T[::-1])
            got = np.asarray(back[name]["boxes"], np.float32).reshape(-1, 4)
            got_order = np.lexsort(got.T[::-1])
            np.testing.assert_allclose(got[got_order], boxes[order], atol=0.02, err_msg=f"{fmt} {name}")
            assert np.asarray(back[name]["labels"])[got_order].tolist() == labels[order].tolist()

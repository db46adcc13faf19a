"""pipelines.track.tracker against a real MLflow server, and pipelines.track.pictures."""

from __future__ import annotations

import json
import logging
import pickle
import time
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from pipelines.track import pictures
from pipelines.track.registry import log_model
from pipelines.track.tracker import Tracker, check_reachable, tracking_uri
from ssd import checkpoint
from ssd import config as C
from ssd.model import build_ssd
from tests.storage import MLFLOW_ARTIFACT_BUCKET


def _start(uri: str, name: str, **kwargs) -> Tracker:
    tracker = Tracker.start(uri=uri, experiment="test-tracking", run_name=name, **kwargs)
    assert tracker.enabled, "the test server must accept runs"
    return tracker


def _tiny_checkpoint(directory, map_value: float, seed: int = 0, per_class: dict | None = None):
    """A tiny checkpoint whose metrics say val mAP `map_value` and per-class APs `per_class`."""
    from pipelines.track.registry import class_metrics

    cfg = C.override(C.preset("tiny"), ["model.num_classes=3"])
    torch.manual_seed(seed)
    ckpt = checkpoint.make_checkpoint(
        build_ssd(cfg),
        cfg,
        dataset={"class_names": ["a", "b"], "category_ids": [3, 5]},
        epoch=1,
        step=1,
        metrics={"map": map_value, **class_metrics(per_class or {})},
    )
    return checkpoint.save(checkpoint.for_inference(ckpt), directory)


# --- URIs --------------------------------------------------------------------------------


def test_tracking_uri_defaults_to_an_absolute_sqlite_file_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri() == "http://tracking:5000"
    assert tracking_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path}/runs/m.db"
    assert tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert tracking_uri("file:./mlruns") == f"file://{tmp_path}/mlruns"
    assert tracking_uri("mlruns") == f"file://{tmp_path}/mlruns"


@pytest.mark.slow
def test_check_reachable_names_what_is_wrong(mlflow_server, dead_tracking_uri, tmp_path):
    assert check_reachable(mlflow_server) is None
    assert "no answer from" in check_reachable(dead_tracking_uri, timeout_s=1.0)
    assert check_reachable(f"sqlite:///{tmp_path}/new.db") is None
    assert "does not exist" in check_reachable(f"sqlite:///{tmp_path}/missing/dir/m.db")


# --- logging -----------------------------------------------------------------------------


@pytest.mark.slow
def test_params_metrics_and_artifacts_reach_the_server(mlflow_server):
    tracker = _start(mlflow_server, "everything", tags={"team": "vision"})
    params = {f"p{i:03d}": i for i in range(150)}  # more than MLflow's 100 per batch
    params["long"] = "x" * 7000  # more than MLflow's 6000 characters per value
    tracker.log_params(params)
    for step, loss in enumerate([1.0, 0.5, 0.25]):
        tracker.log_metrics({"loss": loss, "lr": np.float32(0.1), "note": "skipped", "none": None}, step=step)
    tracker.log_text("hello", "notes/hello.txt")
    tracker.log_image(Image.new("RGB", (8, 6), (255, 0, 0)), "pictures/red.png")
    tracker.log_figure(
        pictures.precision_recall_figure({"a": (np.linspace(0, 1, 11), np.ones(11))}), "pr.png"
    )
    tracker.end()

    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["team"] == "vision"
    assert len(run.data.params) == 151
    assert run.data.params["p149"] == "149"
    assert len(run.data.params["long"]) == 6000 and run.data.params["long"].endswith("...")
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 1.0),
        (1, 0.5),
        (2, 0.25),
    ]
    assert set(run.data.metrics) == {"loss", "lr"}
    assert run.data.metrics["lr"] == pytest.approx(0.1)
    listed = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert listed == {"notes", "pictures", "pr.png"}
    assert [a.path for a in client.list_artifacts(tracker.run_id, "pictures")] == ["pictures/red.png"]
    # the server keeps them in its bucket (an S3 API, as on a cloud cluster), not on a local disk
    objects = boto3.client("s3").list_objects_v2(Bucket=MLFLOW_ARTIFACT_BUCKET)["Contents"]
    stored = {o["Key"] for o in objects if f"/{tracker.run_id}/" in o["Key"]}
    expected = {"notes/hello.txt", "pictures/red.png", "pr.png"}
    assert {key.split("/artifacts/")[-1] for key in stored} == expected


@pytest.mark.slow
def test_a_resumed_run_keeps_logging_into_the_same_run(mlflow_server, caplog):
    first = _start(mlflow_server, "resumed")
    first.log_params({"epochs": 2, "lr": 0.1})
    first.log_metrics({"loss": 1.0}, step=0)
    first.end("KILLED")

    again = _start(mlflow_server, "ignored", run_id=first.run_id)
    assert (again.run_id, again.experiment_id) == (first.run_id, first.experiment_id)
    client = MlflowClient(mlflow_server)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="pipelines.track.tracker"):
        again.log_params({"epochs": 4, "lr": 0.1, "resumed_from": 1})  # epochs changed: kept, warned
    assert "epochs" in caplog.text
    assert again.enabled
    again.log_metrics({"loss": 0.5}, step=1)
    again.end()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"epochs": "2", "lr": "0.1", "resumed_from": "1"}
    assert [
        m.value for m in sorted(client.get_metric_history(first.run_id, "loss"), key=lambda m: m.step)
    ] == [
        1.0,
        0.5,
    ]


def test_a_dead_server_gives_a_disabled_tracker_quickly(dead_tracking_uri, caplog, tmp_path):
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipelines.track.tracker"):
        tracker = Tracker.start(uri=dead_tracking_uri, experiment="nowhere")
    assert time.monotonic() - started < 5.0
    assert not tracker.enabled and tracker.run_id is None
    assert dead_tracking_uri in caplog.text and "without tracking" in caplog.text
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_text("x", "x.txt")
    tracker.set_tags({"a": "b"})
    tracker.end("FAILED")
    assert log_model(tracker, str(_tiny_checkpoint(tmp_path, 0.5)), register_as="never") is None
    assert len([r for r in caplog.records if r.name == "pipelines.track.tracker"]) == 1


def test_a_tracker_whose_server_goes_away_warns_once_and_stops(dead_tracking_uri, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = Tracker(dead_tracking_uri, MlflowClient(dead_tracking_uri), run_id="0" * 32, experiment_id="1")
    with caplog.at_level(logging.WARNING, logger="pipelines.track.tracker"):
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_metrics({"loss": 0.5}, step=1)
        tracker.end()
    assert not tracker.enabled
    warnings = [r for r in caplog.records if r.name == "pipelines.track.tracker"]
    assert len(warnings) == 1
    assert "logging metrics failed" in warnings[0].getMessage()


def test_a_tracker_is_not_sent_to_other_processes(dead_tracking_uri):
    with pytest.raises(TypeError, match=r"Tracker\.start"):
        pickle.dumps(Tracker.disabled(dead_tracking_uri))


# --- models ------------------------------------------------------------------------------


@pytest.mark.slow
def test_champion_alias_moves_only_to_a_better_model(mlflow_server, tmp_path):
    name = "champion-test"
    outcomes = []
    for i, value in enumerate([0.5, 0.3, 0.7]):
        tracker = _start(mlflow_server, f"model-{i}")
        outcomes.append(log_model(tracker, str(_tiny_checkpoint(tmp_path / str(i), value)), register_as=name))
        tracker.end()

    assert [(o.version, o.value, o.champion, o.previous_champion) for o in outcomes] == [
        ("1", 0.5, True, None),
        ("2", 0.3, False, "1"),
        ("3", 0.7, True, "1"),
    ]
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    assert client.get_model_version_by_alias(name, "champion").version == "3"
    second = client.get_model_version(name, "2")
    assert second.tags["map"] == "0.3" and second.tags["config"] == "tiny"
    # The OSS registry keeps no model_id column: the logged model is in the source URI.
    assert second.run_id is not None and second.source.startswith("models:/m-")


def test_the_champion_gate_refuses_a_version_that_loses_a_class_while_gaining_overall(
    mlflow_server, tmp_path
):
    """Version 2 beats version 1 overall but loses 0.2 AP on class b: refused, the decision
    and its per-class deltas tagged on the version and written to its run; version 3 gains
    overall and loses at most 0.05 on a class: promoted. Without per-class APs on the holder
    the gate compares overall mAP only."""
    from pipelines.track.registry import GATE_FILE, GATE_TAG, PER_CLASS_TAG

    name = "gate-test"
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    steps = [
        (0.40, {"a": 0.40, "b": 0.40}),
        (0.45, {"a": 0.70, "b": 0.20}),  # +0.05 overall, b -0.20: refused
        (0.42, {"a": 0.45, "b": 0.36}),  # +0.02 overall, b -0.04: promoted
    ]
    outcomes, runs = [], []
    for i, (value, per_class) in enumerate(steps):
        tracker = _start(mlflow_server, f"gate-{i}")
        path = _tiny_checkpoint(tmp_path / str(i), value, per_class=per_class)
        outcomes.append(log_model(tracker, str(path), register_as=name))
        runs.append(tracker.run_id)
        tracker.end()
    assert [(o.version, o.champion) for o in outcomes] == [("1", True), ("2", False), ("3", True)]
    assert client.get_model_version_by_alias(name, "champion").version == "3"

    refused = outcomes[1].gate
    assert refused["champion_version"] == "1" and "b" in refused["reason"]
    deltas = {c["class"]: (round(c["delta"], 6), c["regressed"]) for c in refused["classes"]}
    assert deltas == {"a": (0.3, False), "b": (-0.2, True)}
    tagged = json.loads(client.get_model_version(name, "2").tags[GATE_TAG])
    assert tagged["promote"] is False and tagged["classes"] == refused["classes"]
    assert json.loads(client.get_model_version(name, "2").tags[PER_CLASS_TAG]) == {"a": 0.7, "b": 0.2}
    where = {"run_id": runs[1], "artifact_path": GATE_FILE, "tracking_uri": mlflow_server}
    text = Path(mlflow.artifacts.download_artifacts(**where)).read_text()
    assert text.startswith("champion gate: not promoted") and "b" in text and "-0.2000" in text
    assert outcomes[2].gate["promote"] and outcomes[2].gate["champion_version"] == "1"

    tracker = _start(mlflow_server, "gate-3")  # against version 3, b -0.03 passes 0.05 but not 0.02
    path = _tiny_checkpoint(tmp_path / "3", 0.43, per_class={"a": 0.5, "b": 0.33})
    stricter = log_model(tracker, str(path), register_as=name, max_class_drop=0.02)
    tracker.end()
    assert not stricter.champion and [c["class"] for c in stricter.gate["classes"] if c["regressed"]] == ["b"]


@pytest.mark.slow
def test_log_model_without_registering_logs_a_model_of_the_run(mlflow_server, tmp_path):
    tracker = _start(mlflow_server, "unregistered")
    assert log_model(tracker, str(_tiny_checkpoint(tmp_path, 0.4)), register_as=None) is None
    assert tracker.enabled
    run = MlflowClient(mlflow_server).get_run(tracker.run_id)
    [output] = run.outputs.model_outputs
    logged = MlflowClient(mlflow_server).get_logged_model(output.model_id)
    assert (logged.name, logged.source_run_id, logged.status.to_proto()) == (
        "model",
        tracker.run_id,
        2,
    )  # READY


@pytest.mark.slow
def test_a_local_sqlite_store_tracks_and_registers_without_a_server(tmp_path, monkeypatch):
    from pipelines.track.models import load_model

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # nothing may fall back to the default store ./mlflow.db
    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    tracker = _start(store, "local")
    tracker.log_metrics({"loss": 2.0}, step=0)
    outcome = log_model(tracker, str(_tiny_checkpoint(tmp_path / "ckpt", 0.5)), register_as="local")
    tracker.end()

    assert outcome is not None and outcome.champion
    loaded = load_model("models:/local@champion", tracking_uri=store, cache_dir=str(tmp_path / "cache"))
    assert (loaded.name, loaded.version, loaded.run_id) == ("local", "1", tracker.run_id)
    assert list(workdir.iterdir()) == []  # artifacts sit next to the database, not in ./mlruns
    assert (tmp_path / "store" / "mlruns" / "test-tracking" / "models").is_dir()  # the logged model


# --- pictures ----------------------------------------------------------------------------


def test_detection_grid_tiles_images_and_draws_boxes_in_class_colours():
    images = np.zeros((5, 3, 64, 64), dtype=np.uint8)  # [B, 3, S, S]
    detections = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 40.0, 50.0], [0.0, 0.0, 63.0, 63.0]]),
            "scores": torch.tensor([0.9, 0.1]),  # the second is below the threshold
            "labels": torch.tensor([2, 1]),
        }
    ] * 5
    truth = [{"boxes": np.array([[5.0, 30.0, 60.0, 60.0]]), "labels": np.array([1])}] * 5
    grid = pictures.detection_grid(images, detections, truth, class_names=["a", "b"], columns=3)

    assert grid.size == (3 * 64 + 2 * pictures.GAP, 2 * 64 + 1 * pictures.GAP)
    pixels = np.asarray(grid)
    assert tuple(pixels[35, 10]) == pictures.class_colour(2)  # left edge of the predicted box
    assert tuple(pixels[63, 63 + pictures.GAP + 62]) == (0, 0, 0)  # no box at 0.1
    assert tuple(pixels[45, 5]) == pictures.TRUTH_COLOUR or tuple(pixels[44, 5]) == pictures.TRUTH_COLOUR
    assert tuple(pixels[-1, -1]) == pictures.GAP_COLOUR  # the sixth cell is empty


def test_detection_grid_takes_a_list_of_differently_sized_images():
    images = [np.zeros((40, 30, 3), np.uint8), np.zeros((20, 50, 3), np.uint8)]
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}
    grid = pictures.detection_grid(images, [empty, empty], columns=4)
    assert grid.size == (2 * 50 + pictures.GAP, 40)


def test_precision_recall_figure_renders_without_pyplot():
    recall = np.linspace(0, 1, 101)
    figure = pictures.precision_recall_figure(
        {"a": (recall, 1 - recall), "b": (recall, np.full(101, -1.0))}, title="val"
    )
    image = pictures.figure_to_image(figure)
    assert image.size == (600, 500)
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels == ["a (AP 0.500)", "b (AP 0.000)"]

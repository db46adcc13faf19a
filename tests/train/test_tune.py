"""`rayssd tune` end to end: a small search on `tiny` whose trials are real `rayssd train` runs on
Ray Tune, ASHA stopping the weak ones, tracked as one MLflow search with a child run per trial
and the best model registered through the champion gate, on a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.data.builtin import write_builtin

pytestmark = pytest.mark.slow

EXPERIMENT = "test-tune"
REGISTERED = "tune-test"


def test_a_search_stops_weak_trials_early_and_registers_the_best(mlflow_server, tmp_path):
    """Four trials in turn (two cores hold one): the first learns (lr 3e-3), the other three
    barely move (lr 1e-7), so ASHA stops them at the epoch-1 rung against the first. Run as the
    CLI in its own process: its own local Ray, with the dashboard Ray Train's placement-group
    cleaner needs for a stopped trial."""
    data = tmp_path / "data"
    write_builtin(data, seed=0, train_images=512, val_images=16, image_size=160)
    argv = [
        *(sys.executable, "-m", "jobs.cli", "tune", "--preset", "tiny"),
        *("--data", str(data / "annotations" / "instances_train.json")),
        *("--val-data", str(data / "annotations" / "instances_val.json")),
        *("--set", "train.epochs=2", "--set", "train.batch_size=8", "--set", "train.warmup_epochs=0"),
        *("--search", "train.lr=grid(0.003,1e-7,1e-7,1e-7)", "--trials", "1"),
        *("--storage", str(tmp_path / "runs"), "--name", "search", "--experiment", EXPERIMENT),
        *("--register-as", REGISTERED),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "4 trials, 1 at a time" in out and "| trial | status |" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "_0000" in line]
    assert len(rows) == 4
    statuses = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in rows}
    assert sorted(statuses.values()).count("finished") >= 1
    assert sum(status == "stopped early" for status in statuses.values()) >= 1, out
    assert f"registered models:/{REGISTERED}/1" in out and "champion gate: promoted" in out

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [parent] = client.search_runs([experiment.experiment_id], "tags.`rayssd.job` = 'tune'")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.train.lr"] == "grid(0.003,1e-7,1e-7,1e-7)"
    assert parent.data.metrics["trials_stopped_early"] >= 1 and parent.data.metrics["best_map"] > 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.md", "trials.json", "search_space.json", "config.yaml", "champion_gate.txt"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "pictures")} == {
        "pictures/map_by_epoch.png"
    }
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    lrs = sorted(float(c.data.params["train.lr"]) for c in children)
    assert lrs == pytest.approx([1e-7, 1e-7, 1e-7, 0.003])
    for child in children:
        history = client.get_metric_history(child.info.run_id, "map")
        assert len(history) >= 1  # per-epoch val mAP in every trial's own run
        if child.info.status == "KILLED":  # stopped at a rung: epoch 1, or 2 of 2 (ASHA's last rung)
            assert child.data.tags["rayssd.tune_stopped"].startswith("early stopping")
        else:
            assert child.info.status == "FINISHED" and len(history) == 2
    assert any(c.info.status == "KILLED" for c in children)

    trials_file = client.download_artifacts(parent.info.run_id, "trials.json", str(tmp_path))
    trials = json.loads(Path(trials_file).read_text())
    best = trials[0]
    assert best["status"] == "finished" and best["config"]["train.lr"] == pytest.approx(0.003)
    version = client.get_model_version_by_alias(REGISTERED, "champion")
    assert version.version == "1" and json.loads(version.tags["champion_gate"])["promote"] is True
    assert (tmp_path / "runs" / "search" / "rayssd_tune.json").is_file()


def test_tune_refuses_a_bad_search_before_ray_starts(tmp_path):
    data = tmp_path / "data"
    write_builtin(data, seed=0, train_images=8, val_images=4, image_size=96)
    train = str(data / "annotations" / "instances_train.json")
    argv = [sys.executable, "-m", "jobs.cli", "tune", "--data", train]
    for extra, needle in (
        (["--search", "train.lr=loguniform(0,1)"], "low > 0"),
        (["--search", "train.nope=choice(1,2)"], "train.nope"),
        (["--resume"], "--resume needs --name"),
        (["--trials", "0"], "--trials"),
    ):
        done = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        assert done.returncode == 2 and len(errors) == 1 and needle in errors[0], done.stderr[-1500:]
    assert not (tmp_path / "rayssd-runs").exists()

"""`rayssd tune` end to end: a small search on `tiny` whose trials are real `rayssd train` runs on
Ray Tune, ASHA stopping the weak ones, interrupted with Ctrl-C and resumed, tracked as one MLflow
search with a child run per trial and the best model registered through the champion gate, on a
real MLflow server; and what is refused before Ray starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.data.builtin import write_builtin
from pipelines.train.tune import remove_placement_group

pytestmark = pytest.mark.slow

EXPERIMENT = "test-tune"
REGISTERED = "tune-test"


def test_a_search_stops_weak_trials_early_resumes_and_registers_the_best(mlflow_server, bucket, tmp_path):
    """Four trials in turn (two cores hold one): the first learns (lr 3e-3), the other three
    barely move (lr 1e-7), so ASHA stops the second at the epoch-1 rung against the first; the
    next trial can only start once the stopped one's workers are freed. Ctrl-C once a third
    trial runs; --resume continues the same search (same MLflow runs) to the end. Run as the CLI
    in its own process: its own local Ray. The search, its trials' checkpoints and the best
    model are kept in a bucket (a real S3 API), as on a cloud cluster."""
    data = tmp_path / "data"
    write_builtin(data, seed=0, train_images=512, val_images=16, image_size=160)
    argv = [
        *(sys.executable, "-m", "jobs.cli", "tune", "--preset", "tiny"),
        *("--data", str(data / "annotations" / "instances_train.json")),
        *("--val-data", str(data / "annotations" / "instances_val.json")),
        *("--set", "train.epochs=2", "--set", "train.batch_size=8", "--set", "train.warmup_epochs=0"),
        # unaugmented (prepared once, shared by the trials): lr 3e-3 learns in one epoch what
        # augmented scenes take several for, so the rung-1 comparison is not a coin toss
        *("--set", "data.augment=false"),
        *("--search", "train.lr=grid(0.003,1e-7,1e-7,1e-7)", "--trials", "1"),
        *("--storage", f"{bucket}/runs", "--name", "search", "--experiment", EXPERIMENT),
        *("--register-as", REGISTERED),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)

    log = (tmp_path / "first.log").open("w+")
    first = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        _wait_for_a_third_trial(client, first, timeout_s=900)
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=180) == 130
    finally:
        if first.poll() is None:
            first.kill()
    log.seek(0)
    said = log.read()
    assert "search search interrupted; continue it with --resume --name search" in said, said[-3000:]
    [parent] = _parents(client)
    assert parent.info.status == "KILLED"

    resumed = [*argv, "--resume"]
    done = subprocess.run(resumed, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    assert "4 trials, 1 at a time" in out and "| trial | status |" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "_0000" in line]
    assert len(rows) == 4
    statuses = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in rows}
    assert sorted(statuses.values()).count("finished") >= 1
    assert sum(status == "stopped early" for status in statuses.values()) >= 1, out
    assert f"registered models:/{REGISTERED}/1" in out and "champion gate: promoted" in out

    [parent] = _parents(client)  # the resumed search kept its run
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.train.lr"] == "grid(0.003,1e-7,1e-7,1e-7)"
    assert parent.data.metrics["trials_stopped_early"] >= 1 and parent.data.metrics["best_map"] > 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.md", "trials.json", "search_space.json", "config.yaml", "champion_gate.txt"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "pictures")} == {
        "pictures/map_by_epoch.png"
    }
    children = _children(client, parent.info.run_id)
    assert len(children) == 4  # the interrupted trial went on in its own run
    lrs = sorted(float(c.data.params["train.lr"]) for c in children)
    assert lrs == pytest.approx([1e-7, 1e-7, 1e-7, 0.003])
    for child in children:
        history = client.get_metric_history(child.info.run_id, "map")
        assert len(history) >= 1  # per-epoch val mAP in every trial's own run
        if child.info.status == "KILLED":  # stopped at a rung: epoch 1, or 2 of 2 (ASHA's last rung)
            assert child.data.tags["rayssd.tune_stopped"].startswith("early stopping")
        else:
            assert child.info.status == "FINISHED" and len(history) == 2, child
    assert any(c.info.status == "KILLED" for c in children)

    trials_file = client.download_artifacts(parent.info.run_id, "trials.json", str(tmp_path))
    trials = json.loads(Path(trials_file).read_text())
    best = trials[0]
    assert best["checkpoint"].startswith(f"{bucket}/runs/search/trials/")  # a URI one can use
    assert best["status"] == "finished" and best["config"]["train.lr"] == pytest.approx(0.003)
    from pipelines.data.sources import resolve_location

    for kept in ("rayssd_tune.json", "best/checkpoint.pt", "tune"):  # the record, the model, Tune's state
        assert resolve_location(f"{bucket}/runs/search/{kept}").exists(), kept
    assert not (tmp_path / "runs").exists() and not (tmp_path / "rayssd-runs").exists()
    version = client.get_model_version_by_alias(REGISTERED, "champion")
    assert version.version == "1" and json.loads(version.tags["champion_gate"])["promote"] is True


def _parents(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], "tags.`rayssd.job` = 'tune'")


def _children(client: MlflowClient, parent_id: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def _wait_for_a_third_trial(client: MlflowClient, search: subprocess.Popen, timeout_s: float) -> None:
    """Until a third trial's run has logged a metric (so two trials have ended, the second
    stopped or finished, and its workers were freed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert search.poll() is None, "the search ended before it was interrupted"
        parents = _parents(client) if client.get_experiment_by_name(EXPERIMENT) else []
        if parents:
            children = sorted(_children(client, parents[0].info.run_id), key=lambda r: r.info.start_time)
            if len(children) >= 3 and children[2].data.metrics:
                return
        time.sleep(2)
    raise AssertionError(f"no third trial ran within {timeout_s:.0f} s")


def test_a_stopped_trials_placement_group_is_removed_once(ray_local):
    """What `tune` does as a trial ends: the group named is removed; a removed group, or none
    named, is left alone."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    group = placement_group([{"CPU": 0.5}])
    ray.get(group.ready(), timeout=60)
    assert placement_group_table(group)["state"] == "CREATED"
    assert remove_placement_group(group.id.hex()) is True
    assert placement_group_table(group)["state"] == "REMOVED"
    assert remove_placement_group(group.id.hex()) is False
    assert remove_placement_group(None) is False


def test_tune_refuses_a_bad_search_before_ray_starts(tmp_path, capsys, monkeypatch):
    """One line each, exit status 2: through the CLI in its own process once (no Ray line, no
    run folder), the other cases through the same entry point in this one."""
    from jobs import cli

    data = tmp_path / "data"
    write_builtin(data, seed=0, train_images=8, val_images=4, image_size=96)
    train = str(data / "annotations" / "instances_train.json")
    argv = ["tune", "--data", train]
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *argv, "--search", "train.lr=loguniform(0,1)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and len(errors) == 1 and "low > 0" in errors[0], done.stderr[-1500:]
    assert "Ray" not in done.stdout + done.stderr.replace("rayssd", "")
    monkeypatch.chdir(tmp_path)  # where a run folder would appear
    handler = signal.getsignal(signal.SIGTERM)  # the entry point installs its own: put back after
    try:
        for extra, needle in (
            (["--search", "train.nope=choice(1,2)"], "train.nope"),
            (["--resume"], "--resume needs --name"),
            (["--trials", "0"], "--trials"),
            (["--set", "train.steps=100"], "set train.epochs"),
        ):
            with pytest.raises(SystemExit) as stopped:
                cli.main([*argv, *extra])
            errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
            assert stopped.value.code == 2 and len(errors) == 1 and needle in errors[0], (extra, errors)
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert not (tmp_path / "rayssd-runs").exists()

"""`rayssd quickstart --quick` end to end as a user runs it: its own local Ray, the local
MLflow store, a real HTTP request to the endpoint it starts; then again, stopped by SIGTERM
while it trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import free_port
from tests.processes import STOP_WITHIN_S, assert_all_end, descendants, start_job, terminate_once

pytestmark = pytest.mark.slow


def _quickstart(workdir: Path, out: Path, env: dict[str, str]) -> tuple[dict, str]:
    argv = [
        sys.executable,
        "-m",
        "jobs.quickstart",
        "--quick",
        "--out",
        str(out),
        "--port",
        str(free_port()),
    ]
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summaries = sorted(out.glob("quickstart-*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(summaries[-1].read_text()), done.stdout


def test_quickstart_runs_the_whole_system_and_can_run_again(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("RAY_ADDRESS", None)
    first, out1 = _quickstart(tmp_path, tmp_path / "qs", env)

    assert "[4/4] serve" in out1 and "done in" in out1  # stages shown as they go, then the summary
    # once the first steps are timed, when it should end (printed once)
    assert out1.count("expected: training ends in about ") == 1 and "the whole quickstart in about" in out1
    assert first["serve"]["detections"] > 0  # the endpoint answered a real request with boxes
    assert first["serve"]["model"]["version"] == "1"
    assert first["model_uri"] == "models:/rayssd-quickstart/1" and first["champion"] is True
    assert 0 < first["map50"] <= 1 and first["label_map50"] is not None
    labels = Path(first["labels"])
    assert list((labels / "labels").glob("*.parquet")) and (labels / "detections.json").is_file()
    client = MlflowClient(uri)
    version = client.get_model_version("rayssd-quickstart", "1")
    assert version.run_id == first["train_mlflow_run"]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    kinds = {r.data.tags.get("rayssd.job") for r in runs}
    assert {"train", "label", "serve"} <= kinds  # every stage left its MLflow run

    # Again, as docker or Kubernetes stop it: SIGTERM once it trains and has said when it ends.
    argv = ["jobs.quickstart", "--quick", "--out", str(tmp_path / "qs"), "--port", str(free_port())]
    second, output, _ = start_job(argv, tmp_path, cwd=tmp_path, RAY_ADDRESS=None)
    children: set[int] = set()
    seconds = terminate_once(
        second,
        output,
        "expected: training ends in about ",
        before=lambda: children.update(descendants(second.pid)),
    )
    out2 = output.text
    assert second.returncode == 143, out2[-3000:]
    assert "reused" in out2  # the dataset is not written again
    assert "quickstart: stopped during train; run it again" in out2 and "Traceback" not in out2, out2[-3000:]
    assert seconds < STOP_WITHIN_S
    assert children  # its local Ray, gone with it
    assert_all_end(children)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`rayssd.job` = 'train'"
    )
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]  # the stopped one is not a failure
    assert labels.is_dir() and (labels / "detections.json").is_file()  # the first run's outputs are kept
    assert [str(v.version) for v in client.search_model_versions("name = 'rayssd-quickstart'")] == ["1"]

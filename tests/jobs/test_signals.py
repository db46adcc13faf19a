"""SIGTERM, what docker, Kubernetes and systemd send to stop a process: `rayssd serve`,
`rayssd train` and `rayssd label` stop within seconds, end their MLflow runs as KILLED, say
what to do next, exit 143 and leave no process behind (the quickstart's stop is in
test_quickstart, on its second run)."""

from __future__ import annotations

import tempfile
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from pipelines.data.builtin import write_builtin
from ssd import checkpoint
from ssd import config as C
from ssd.model import build_ssd
from tests.ports import free_port
from tests.processes import STOP_WITHIN_S, assert_all_end, descendants, start_job, terminate_once

pytestmark = pytest.mark.slow


def _statuses(store: str) -> list[str]:
    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [run.info.status for run in client.search_runs(experiments)]


def _untrained_model(tmp_path) -> str:
    """A `tiny` checkpoint of two classes, as training writes it (untrained: nothing here needs
    good boxes)."""
    cfg = C.override(C.preset("tiny"), ["model.num_classes=3"])
    ckpt = checkpoint.make_checkpoint(
        build_ssd(cfg).eval(), cfg, {"class_names": ["a", "b"], "category_ids": [1, 2]}, epoch=1, step=1
    )
    return str(checkpoint.save(checkpoint.for_inference(ckpt), tmp_path / "model"))


def test_serve_stops_on_sigterm_with_its_run_killed_and_no_process_left(tmp_path):
    """Its own local Ray (as `docker run ... rayssd serve` has): the raylet, GCS, agents,
    workers and Serve's actors all go with it."""
    model = _untrained_model(tmp_path)
    port = free_port()
    # its Ray's files in a folder of its own (short: Ray's socket paths have a length limit), so
    # that `--address auto` elsewhere in the session never finds this cluster
    ray_tmp = tempfile.mkdtemp(prefix="rayssd-sigterm-", dir="/tmp")
    argv = ["jobs.serve", "--model", model, "--port", str(port)]
    process, output, store = start_job(argv, tmp_path, RAY_TMPDIR=ray_tmp)
    children: set[int] = set()

    def serving() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert response.status == 200
        children.update(descendants(process.pid))
        assert children  # the local Ray it started

    seconds = terminate_once(process, output, "serving ", before=serving)
    text = output.text
    assert process.returncode == 143, text
    assert "serve: stopped by SIGTERM" in text and "Traceback" not in text, text
    assert "*** SIGTERM received" not in text and "Aborted" not in text, text  # no stack dump
    assert _statuses(store) == ["KILLED"]
    assert_all_end(children)
    assert seconds < STOP_WITHIN_S


def test_train_stops_on_sigterm_naming_the_run_to_resume(ray_local, tmp_path):
    """On the session's Ray (its address, as a job on a cluster): stopped mid-epoch, the run is
    KILLED in MLflow and resumable, and the message says how."""
    address = ray_local.get_runtime_context().gcs_address
    root = tmp_path / "data"
    write_builtin(root, seed=0, train_images=64, val_images=8, image_size=128)
    argv = [
        "jobs.train", "--data", str(root / "annotations" / "instances_train.json"),
        "--val-data", str(root / "annotations" / "instances_val.json"),
        "--storage", str(tmp_path / "runs"), "--name", "stopped", "--address", address, "--workers", "1",
        "--set", "train.epochs=50", "--set", "train.batch_size=2", "--register-as", "none",
    ]  # fmt: skip
    process, output, store = start_job(argv, tmp_path)
    seconds = terminate_once(process, output, "epoch 1/50")
    text = output.text
    assert process.returncode == 143, text
    assert "continue it with --resume --name stopped" in text and "Traceback" not in text, text
    assert _statuses(store) == ["KILLED"]
    assert (tmp_path / "runs" / "stopped" / "rayssd_run.json").is_file()
    assert seconds < STOP_WITHIN_S


def test_label_stops_on_sigterm_with_its_run_killed(ray_local, tmp_path):
    """On the session's Ray, mid-way through a folder of 1000 photos: the labelling run is
    KILLED in MLflow, the job says it stopped and exits 143."""
    import numpy as np
    from PIL import Image

    address = ray_local.get_runtime_context().gcs_address
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(1000):  # several times what labelling gets through before the signal
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), np.uint8)).save(folder / f"{index:04d}.jpg")
    model = _untrained_model(tmp_path)
    argv = [
        "jobs.label", "--model", model, "--input", str(folder), "--out", str(tmp_path / "out"),
        "--address", address, "--workers", "1", "--batch-size", "2",
    ]  # fmt: skip
    process, output, store = start_job(argv, tmp_path)
    seconds = terminate_once(process, output, "labelling ", before=lambda: time.sleep(5))
    text = output.text
    assert process.returncode == 143, text
    assert "label: stopped by SIGTERM" in text and "Traceback" not in text, text
    assert _statuses(store) == ["KILLED"]
    assert seconds < STOP_WITHIN_S

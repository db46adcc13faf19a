"""Jobs on a real Ray head started by the test (`ray start --head`): a training job through
`rayssd submit`, a labelling job through `ray job submit`, and a bad argument that makes a
job fail with its error in the log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs import submit
from pipelines.data.builtin import write_builtin
from tests.ports import free_port

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head():
    """`ray start --head --block` in its own temp dir (so no other Ray in the session finds
    it); killing that process stops the head. Yields (dashboard URL, environment for clients)."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # jobs run `python`
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    port = free_port()
    argv = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(free_port())]
    argv += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(port), "--include-dashboard", "true"]
    argv += ["--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats"]
    # Its own agent ports: the defaults (52365 …) belong to the session's Ray if one runs,
    # and a head whose job agent cannot bind never accepts a job.
    for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                 "metrics-export-port", "ray-client-server-port"):  # fmt: skip
        argv += [f"--{flag}", str(free_port())]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    mode_before = os.environ.get("RAY_AUTH_MODE")
    submit.use_local_token()  # as a `ray` command would, for this process's own client
    client_env = {**env, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    try:
        _wait_for_jobs(url, process)
        yield url, client_env
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:  # `ray start --block` stops its processes gracefully on SIGTERM, which takes ~30 s
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        if mode_before is None and os.environ.pop("RAY_AUTH_MODE", None) is not None:
            import ray._raylet  # later tests see Ray configured as before this module

            ray._raylet.Config.initialize("")


def _wait_for_jobs(url: str, process: subprocess.Popen) -> None:
    """Until a trivial job runs: the Jobs API answers before the head's job agent does."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:
        try:
            client = JobSubmissionClient(url)
            job = client.submit_job(entrypoint="python -c 'print(1)'", submission_id=f"warm-up-{time.time()}")
            while (status := str(client.get_job_status(job).value)) not in ("SUCCEEDED", "FAILED"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"warm-up job still {status} after 120 s")
                time.sleep(0.5)
            assert status == "SUCCEEDED", client.get_job_logs(job)
            return
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("submit-data")
    write_builtin(root, seed=0, train_images=32, val_images=8, image_size=160)
    return {s: str(root / "annotations" / f"instances_{s}.json") for s in ("train", "val")}


def _status(url: str, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(url).get_job_status(job_id).value)


def test_train_with_rayssd_submit_then_label_with_ray_job_submit(head, dataset, tmp_path):
    url, env = head
    storage = tmp_path / "runs"
    train = [sys.executable, "-m", "jobs.cli", "submit", "--address", url, "--job-id", "t-train", "train"]
    train += [
        "--data",
        dataset["train"],
        "--val-data",
        dataset["val"],
        "--workers",
        "1",
        "--storage",
        str(storage),
    ]
    train += [
        "--name",
        "submitted",
        "--register-as",
        "none",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=4",
    ]
    done = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "run submitted: 1 epochs" in done.stdout  # the job's own log, followed
    assert "job t-train: SUCCEEDED" in done.stdout and _status(url, "t-train") == "SUCCEEDED"
    model = storage / "submitted" / "model" / "checkpoint.pt"
    assert model.is_file()

    label = [str(BIN / "ray"), "job", "submit", "--address", url, "--submission-id", "t-label"]
    label += ["--runtime-env", "runtime_env.yaml", "--working-dir", ".", "--"]
    label += ["python", "-m", "jobs.label", "--model", str(model), "--input", dataset["val"]]
    label += ["--out", str(tmp_path / "labels"), "--no-tracking"]
    done = subprocess.run(label, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _status(url, "t-label") == "SUCCEEDED"
    assert "labelled 8 images" in done.stdout
    assert list((tmp_path / "labels" / "labels").glob("*.parquet"))


def test_a_bad_argument_fails_the_job_with_the_error_in_its_log(head, dataset, tmp_path):
    url, env = head
    argv = [sys.executable, "-m", "jobs.cli", "submit", "--address", url, "--job-id", "t-bad", "train"]
    argv += ["--data", dataset["train"], "--storage", str(tmp_path / "runs"), "--set", "train.lr=-1"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert _status(url, "t-bad") == "FAILED"
    assert "train.lr" in done.stdout and "job t-bad: FAILED" in done.stdout
    from ray.job_submission import JobSubmissionClient

    log = JobSubmissionClient(url).get_job_logs("t-bad")
    assert "train: error:" in log and "train.lr" in log and "Traceback" not in log


def test_submit_refuses_a_driver_address_and_builds_the_environment_from_the_project(monkeypatch):
    with pytest.raises(ValueError, match="dashboard URL"):
        submit.dashboard_url("ray://head:10001")
    assert submit.dashboard_url("head:8265") == "http://head:8265"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    env = submit.runtime_env(pip=True)
    assert env["working_dir"] == str(PROJECT) and ".venv/" in env["excludes"]
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert any(dep.startswith("ray[") for dep in env["pip"])
    assert submit.entrypoint("label", ["--", "--model", "a b.pt"]) == "python -m jobs.label --model 'a b.pt'"

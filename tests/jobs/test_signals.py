"""SIGTERM, what docker, Kubernetes and systemd send to stop a process: `rayssd serve` and
`rayssd train` stop within seconds, end their MLflow runs as KILLED, say what to do next,
exit 143 and leave no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.data.builtin import write_builtin
from ssd import checkpoint
from ssd import config as C
from ssd.model import build_ssd
from tests.ports import free_port

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
STOP_WITHIN_S = 60  # a generous bound on 2 shared cores; measured ~9 s for serve


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            found[int(entry)] = (int(fields[1]), fields[0])
    return found


def _descendants(pid: int) -> set[int]:
    table, found, todo = _processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _still_running(pids: set[int]) -> list[str]:
    table = _processes()
    running = [p for p in pids if p in table and table[p][1] != "Z"]
    return [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120] for p in running]


class _Output:
    """A subprocess's merged output, collected by a thread (so its pipe never fills)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, process: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            assert process.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, f"no {text!r} in:\n{''.join(self.lines)}"
            time.sleep(0.2)

    @property
    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)


def _start(argv: list[str], tmp_path: Path, **env: str) -> tuple[subprocess.Popen, _Output, str]:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONUNBUFFERED": "1", **env}
    process = subprocess.Popen(
        [sys.executable, "-m", *argv], cwd=PROJECT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    return process, _Output(process), store


def _terminate_once(
    process: subprocess.Popen, output: _Output, text: str, before: Callable[[], None] = lambda: None
) -> float:
    """Once `text` is printed (and `before` has run), SIGTERM; the seconds until the process
    ended. The process is killed if anything fails on the way."""
    try:
        output.wait_for(text, process, timeout_s=240)
        before()
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=STOP_WITHIN_S)
        return time.monotonic() - start
    finally:
        if process.poll() is None:
            process.kill()


def _statuses(store: str) -> list[str]:
    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [run.info.status for run in client.search_runs(experiments)]


def test_serve_stops_on_sigterm_with_its_run_killed_and_no_process_left(tmp_path):
    """Its own local Ray (as `docker run ... rayssd serve` has): the raylet, GCS, agents,
    workers and Serve's actors all go with it."""
    cfg = C.override(C.preset("tiny"), ["model.num_classes=3"])
    ckpt = checkpoint.make_checkpoint(
        build_ssd(cfg).eval(), cfg, {"class_names": ["a", "b"], "category_ids": [1, 2]}, epoch=1, step=1
    )
    model = checkpoint.save(checkpoint.for_inference(ckpt), tmp_path / "model")
    port = free_port()
    # its Ray's files in a folder of its own (short: Ray's socket paths have a length limit), so
    # that `--address auto` elsewhere in the session never finds this cluster
    ray_tmp = tempfile.mkdtemp(prefix="rayssd-sigterm-", dir="/tmp")
    argv = ["jobs.serve", "--model", str(model), "--port", str(port)]
    process, output, store = _start(argv, tmp_path, RAY_TMPDIR=ray_tmp)
    children: set[int] = set()

    def serving() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert response.status == 200
        children.update(_descendants(process.pid))
        assert children  # the local Ray it started

    seconds = _terminate_once(process, output, "serving ", before=serving)
    text = output.text
    assert process.returncode == 143, text
    assert "serve: stopped by SIGTERM" in text and "Traceback" not in text, text
    assert "*** SIGTERM received" not in text and "Aborted" not in text, text  # no stack dump
    assert _statuses(store) == ["KILLED"]
    deadline = time.monotonic() + 15  # Ray's own processes end right after their parent
    while _still_running(children) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _still_running(children), _still_running(children)
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
    process, output, store = _start(argv, tmp_path)
    seconds = _terminate_once(process, output, "epoch 1/50")
    text = output.text
    assert process.returncode == 143, text
    assert "continue it with --resume --name stopped" in text and "Traceback" not in text, text
    assert _statuses(store) == ["KILLED"]
    assert (tmp_path / "runs" / "stopped" / "rayssd_run.json").is_file()
    assert seconds < STOP_WITHIN_S

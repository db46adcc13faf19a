"""Shared fixtures. Ray start-up dominates test time on two cores, so one local Ray
instance serves the whole session; tests that need their own cluster start it themselves."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from tests.ports import free_port

# The session's own cache of measured memory layouts (`ssd.layout`), inherited by the Ray
# workers and CLI runs it starts: tests neither read nor fill the user's ~/.cache.
os.environ.setdefault("RAYSSD_CACHE_DIR", tempfile.mkdtemp(prefix="rayssd-test-cache-"))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by every test in the session (2 CPUs, no dashboard)."""
    import ray

    from pipelines.common import start_ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    start_ray(None, num_cpus=2)  # as `rayssd` starts a local Ray, or the one already up
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` (sqlite store, proxied artifacts, one worker) for the session;
    yields its URI ``http://127.0.0.1:PORT``."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log_path = root / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",  # two shared cores: one worker is plenty for the tests
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(uri, server, log_path, timeout_s=60.0)
        yield uri
    finally:
        stop_process(server)


def stop_process(server: subprocess.Popen) -> None:
    """Terminate a server subprocess, killing it after 15 s."""
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def wait_for_health(uri: str, server: subprocess.Popen, log_path, timeout_s: float) -> None:
    """Until `uri`/health answers 200 (MLflow's tracking and scoring servers both have it);
    fails with the server's log when it exits or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    log_text = log_path.read_text(errors="replace")
    pytest.fail(f"server at {uri} not healthy (exit code {server.poll()}); its log:\n{log_text}")


@pytest.fixture
def dead_tracking_uri() -> str:
    """An http tracking URI on a free port nobody listens on."""
    return f"http://127.0.0.1:{free_port()}"

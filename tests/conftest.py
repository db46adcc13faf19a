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
from tests.storage import MLFLOW_ARTIFACT_BUCKET, s3_api

# The session's own cache of measured memory layouts (`ssd.layout`), inherited by the Ray
# workers and CLI runs it starts: tests neither read nor fill the user's ~/.cache.
os.environ.setdefault("RAYSSD_CACHE_DIR", tempfile.mkdtemp(prefix="rayssd-test-cache-"))

# Object storage: an S3 API (moto's standalone server, `s3_server`) on 127.0.0.1, reached by
# every client (pyarrow, boto3, MLflow, Ray's workers) through the standard variables alone.
# Set before anything starts Ray, so that its workers inherit them; nothing reaches AWS.
S3_ENDPOINT = f"http://127.0.0.1:{free_port()}"
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
    os.environ.pop(_name, None)
os.environ.update(
    AWS_ENDPOINT_URL=S3_ENDPOINT,
    MLFLOW_S3_ENDPOINT_URL=S3_ENDPOINT,
    AWS_ACCESS_KEY_ID="rayssd-test",
    AWS_SECRET_ACCESS_KEY="rayssd-test-secret",
    AWS_REGION="us-east-1",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on the session's `S3_ENDPOINT`; yields the endpoint."""
    with s3_api(tmp_path_factory.mktemp("s3-server"), S3_ENDPOINT) as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_server, request) -> str:
    """A new, empty bucket for the test; yields ``s3://NAME``."""
    import re
    import uuid

    import boto3

    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


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
def mlflow_server(tmp_path_factory, s3_server):
    """A real ``mlflow server`` (sqlite store, one worker) for the session, proxying artifacts
    to s3://MLFLOW_ARTIFACT_BUCKET/artifacts on the session's S3 API, as on a cloud cluster;
    yields its URI ``http://127.0.0.1:PORT``."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=MLFLOW_ARTIFACT_BUCKET)
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log_path = root / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",  # two shared cores: one worker is plenty for the tests
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{MLFLOW_ARTIFACT_BUCKET}/artifacts",
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


def wait_for_health(
    uri: str, server: subprocess.Popen, log_path, timeout_s: float, path: str = "/health"
) -> None:
    """Until `uri` + `path` answers 200 (MLflow's tracking and scoring servers both have
    /health); fails with the server's log when it exits or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{uri}{path}", timeout=2) as response:
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

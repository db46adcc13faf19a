"""Helpers for tests against the session's S3 API (`tests.conftest.s3_server`)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

MLFLOW_ARTIFACT_BUCKET = "rayssd-mlflow-artifacts"  # the session MLflow server's artifact store


def upload_tree(local: Path, uri: str) -> str:
    """Copy the folder `local` to the object-store folder `uri` (through pyarrow); returns `uri`."""
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), path, destination_filesystem=filesystem)
    return uri


@contextlib.contextmanager
def s3_api(root: Path, endpoint: str) -> Iterator[str]:
    """moto's standalone server (S3, and IAM for `require_credentials`) on `endpoint`
    (``http://127.0.0.1:PORT``) for the block, its log in `root`; yields the endpoint."""
    from tests.conftest import stop_process, wait_for_health

    log_path = root / "server.log"
    port = endpoint.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port]
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=root)
    try:
        wait_for_health(endpoint, server, log_path, timeout_s=60.0, path="/moto-api/")
        yield endpoint
    finally:
        stop_process(server)


def require_credentials(endpoint: str) -> None:
    """From now on the moto server at `endpoint` checks every request's credentials (keys made
    through its IAM API), as a real object store does; until then it accepts any."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200

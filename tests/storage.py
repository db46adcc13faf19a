"""Helpers for tests against the session's S3 API (`tests.conftest.s3_server`)."""

from __future__ import annotations

from pathlib import Path

MLFLOW_ARTIFACT_BUCKET = "rayssd-mlflow-artifacts"  # the session MLflow server's artifact store


def upload_tree(local: Path, uri: str) -> str:
    """Copy the folder `local` to the object-store folder `uri` (through pyarrow); returns `uri`."""
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), path, destination_filesystem=filesystem)
    return uri

"""Load a trained model from a checkpoint path or an MLflow URI.

Labelling, serving and ``rayssd evaluate`` all take one model argument:

* a checkpoint file, or a directory holding ``checkpoint.pt`` (a Ray Train checkpoint);
* ``runs:/<run_id>/<path>`` — a checkpoint logged as a run artifact, or the run's logged model;
* ``models:/NAME@alias``, ``models:/NAME/VERSION`` — the model registry;
* ``models:/m-<id>`` — an MLflow logged model;
* an ``.onnx`` file written by ``rayssd export``, run on ONNX Runtime (`pipelines.track.engines`);
* either in object storage (``s3://BUCKET/runs/NAME/model/checkpoint.pt``, ``gs://...``), read
  through pyarrow's filesystems with the standard credentials and endpoint variables.

MLflow and bucket URIs are downloaded (once, into a cache directory) and the single ``checkpoint.pt``
inside is read with `ssd.checkpoint.load` (``weights_only=True``): a model from the
registry is never unpickled or imported as pyfunc code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from pipelines.track.engines import ONNX_SUFFIX
from pipelines.track.tracker import check_reachable
from pipelines.track.tracker import tracking_uri as resolve_tracking_uri
from ssd import checkpoint
from ssd import config as C

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("runs", "models")


@dataclass
class LoadedModel:
    model: torch.nn.Module | None  # eval mode, on the CPU; None for an ONNX file
    cfg: C.Config
    dataset: dict  # checkpoint["dataset"]: class_names, category_ids, ...
    uri: str  # as given
    checkpoint_path: str  # local file that was loaded
    name: str | None = None  # registered model name, when from the registry
    version: str | None = None  # registered model version (for lineage)
    run_id: str | None = None  # run that produced the model, when known
    engine: str = "torch"  # "torch" (a checkpoint) or "onnxruntime" (an exported .onnx file)

    def detector(self, *, device: str = "cpu", threads: int | None = None, batch: int = 8) -> Callable:
        """What labelling and serving call: `ssd.detector.Detector` over the weights (moved
        to `device`, in the memory layout `ssd.layout` finds faster here at `batch`), or
        `engines.OnnxDetector` over the ONNX file (`threads` intra-op threads; the CUDA
        provider for a CUDA device when present)."""
        if self.engine == "onnxruntime":
            from pipelines.track.engines import OnnxDetector

            return OnnxDetector(self.checkpoint_path, threads=threads, device=device)
        from ssd.detector import Detector

        return Detector(self.model.to(device), self.cfg, channels_last=None, batch=batch)

    @property
    def label(self) -> str:
        """How messages name it: NAME vVERSION, NAME, or the URI as given."""
        if self.name:
            return f"{self.name} v{self.version}" if self.version else self.name
        return self.uri

    def lineage_params(self) -> dict[str, str | None]:
        """The MLflow params that record which model a labelling or serving run used."""
        return {
            "model.uri": self.uri,
            "model.name": self.name,
            "model.version": self.version,
            "model.run_id": self.run_id,
            "model.config": self.cfg.name,
        }

    def lineage_tags(self, job: str) -> dict[str, str]:
        """The MLflow tags of a `job` run that used this model (its version when registered)."""
        tags = {"rayssd.job": job, "rayssd.model_uri": self.uri}
        if self.version:
            tags["rayssd.model_version"] = f"{self.name}/{self.version}"
        return tags


@dataclass(frozen=True)
class _Source:
    """Where an MLflow URI's files are, and what it is in the registry."""

    artifact_uri: str  # something mlflow.artifacts.download_artifacts accepts
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


def load_model(uri: str, *, tracking_uri: str | None = None, cache_dir: str | None = None) -> LoadedModel:
    """The model at `uri` (see the module docstring for the forms), in eval mode on the CPU.

    `tracking_uri` is used for ``runs:/`` and ``models:/`` URIs (default:
    `pipelines.track.tracker.tracking_uri()`). Downloads go to `cache_dir` (default
    ``$XDG_CACHE_HOME/rayssd/models``). Raises FileNotFoundError for a missing file or
    MLflow database; ValueError for anything that is not a rayssd checkpoint, an unknown
    model, alias, version or run, or an unreachable tracking server.
    """
    scheme = urlparse(uri).scheme
    source = _Source(uri)
    # a download (from MLflow or a bucket): errors name the URI as well as the local copy
    copied = scheme in MLFLOW_SCHEMES or ("://" in uri and scheme not in ("", "file"))
    if scheme in MLFLOW_SCHEMES:
        store = resolve_tracking_uri(tracking_uri)
        source = _resolve(uri, store)
        path = _find_checkpoint(_download(source, uri, store, cache_dir), uri)
    elif scheme in ("", "file") or len(scheme) == 1:  # a path (or a Windows drive letter)
        local = Path(urlparse(uri).path if scheme == "file" else uri)
        if local.suffix == ONNX_SUFFIX:
            return _load_onnx(local, uri)
        path = _local_checkpoint(local)
    elif "://" in uri:  # object storage (s3://, gs://, ...): through pyarrow, cached
        path = _object_store_file(uri, cache_dir)
        if path.suffix == ONNX_SUFFIX:
            return _load_onnx(path, uri)
    else:
        raise ValueError(
            f"cannot load a model from {uri!r}: expected a checkpoint path or bucket URI, a runs:/ or a "
            "models:/ URI"
        )
    try:
        ckpt = checkpoint.load(path)
    except ValueError as exc:
        if not copied:
            raise
        # the copy is ours; the object (cut short by an interrupted upload, say) is the user's
        raise ValueError(f"{uri} (copied to {path}): {exc}") from None
    model, cfg = checkpoint.build_model(ckpt)
    log.info("loaded %s (%s) from %s", uri, cfg.name, path)
    return LoadedModel(
        model, cfg, ckpt["dataset"], uri, str(path), source.name, source.version, source.run_id
    )


def _load_onnx(path: Path, uri: str) -> LoadedModel:
    """An exported end-to-end graph: its config and classes from the file's metadata."""
    from pipelines.track import engines

    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model file at {path}")
    cfg, dataset = engines.export_metadata(engines.session(path, threads=1), path)
    log.info("loaded %s (%s, ONNX Runtime)", uri, cfg.name)
    return LoadedModel(None, cfg, dataset, uri, str(path), engine="onnxruntime")


def pinned_uri(model: LoadedModel) -> str:
    """A URI that names exactly the loaded model: a registry alias resolved to its version, so
    workers cannot load another model if the alias moves while the job runs."""
    if model.name and model.version and model.uri.startswith("models:/"):
        return f"models:/{model.name}/{model.version}"
    return model.uri


def _local_checkpoint(path: Path) -> Path:
    if path.is_dir():
        if (path / checkpoint.FILE_NAME).is_file():
            return path / checkpoint.FILE_NAME
        nested = sorted(path.glob(f"*/{checkpoint.FILE_NAME}"))  # a Ray Train run directory
        hint = f"; {len(nested)} subdirectories have one, e.g. {nested[-1].parent}" if nested else ""
        raise FileNotFoundError(f"no {checkpoint.FILE_NAME} in directory {path}{hint}")
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint file or directory at {path}")
    return path


def _client(store: str) -> MlflowClient:
    """A client for `store`, after checking it is there (an unreachable server would
    otherwise be retried for minutes; a missing sqlite file would be created empty)."""
    from mlflow import MlflowClient

    if store.startswith("sqlite:///"):
        db = Path(store[len("sqlite:///") :])
        if not db.is_file():
            raise FileNotFoundError(f"no MLflow database at {db} (tracking URI {store})")
    reason = check_reachable(store)
    if reason is not None:
        raise ValueError(f"MLflow tracking server {store} is unreachable: {reason}")
    return MlflowClient(tracking_uri=store, registry_uri=store)


def _resolve(uri: str, store: str) -> _Source:
    client = _client(store)
    body = uri.split(":/", 1)[1].lstrip("/")
    if uri.startswith("runs:"):
        return _run_source(client, body, uri, store)
    if body.startswith("m-") and "/" not in body and "@" not in body:
        logged = _get(
            lambda: client.get_logged_model(body), f"no MLflow logged model {body!r} at {store} (from {uri})"
        )
        return _Source(logged.artifact_location, run_id=logged.source_run_id)
    name, version = _registry_version(client, body, uri, store)
    run_id = client.get_model_version(name, version).run_id
    return _Source(client.get_model_version_download_uri(name, version), name, version, run_id)


def _run_source(client: MlflowClient, body: str, uri: str, store: str) -> _Source:
    """``runs:/<id>/<path>``: the run's logged model named after the first part of `path`
    (MLflow 3 keeps models outside the run's artifacts), else the run artifact at `path`.

    Resolved here rather than by handing ``runs:/`` to MLflow: MLflow 3.17 looks the
    logged model up through the default tracking URI, not the one it is given (and so
    creates ./mlflow.db as a side effect).
    """
    run_id, _, path = body.partition("/")
    run = _get(lambda: client.get_run(run_id), f"no MLflow run {run_id!r} at {store} (from {uri})")
    first, _, rest = path.partition("/")
    steps = {o.model_id: o.step for o in (run.outputs.model_outputs if run.outputs else [])}
    models = [
        m
        for m in client.search_logged_models([run.info.experiment_id], filter_string=f"name = '{first}'")
        if m.source_run_id == run_id
    ]
    if models:
        latest = max(models, key=lambda m: (steps.get(m.model_id, -1), m.creation_timestamp))
        return _Source(f"{latest.artifact_location}/{rest}".rstrip("/"), run_id=run_id)
    return _Source(f"{run.info.artifact_uri}/{path}".rstrip("/"), run_id=run_id)


def _registry_version(client: MlflowClient, body: str, uri: str, store: str) -> tuple[str, str]:
    """(name, version) of ``NAME@alias`` or ``NAME/VERSION``, with errors listing what exists."""
    if "@" in body:
        name, _, alias = body.partition("@")
    else:
        name, _, version = body.rpartition("/")
        if not name or not version:
            raise ValueError(
                f"{uri!r} is not a model URI: expected models:/NAME@alias, models:/NAME/VERSION "
                "or models:/m-ID"
            )
    registered = _get(
        lambda: client.get_registered_model(name),
        f"no registered model {name!r} at {store} (from {uri}); registered models: {_known_models(client)}",
    )
    if "@" in body:
        if alias not in registered.aliases:
            known = ", ".join(f"@{a} (version {v})" for a, v in sorted(registered.aliases.items()))
            raise ValueError(
                f"registered model {name!r} has no alias {alias!r} (from {uri}); aliases: {known or 'none'}"
            )
        return name, str(registered.aliases[alias])
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    if not version.isdigit() or int(version) not in versions:
        raise ValueError(
            f"registered model {name!r} has no version {version!r} (from {uri}); versions: "
            f"{', '.join(map(str, versions)) or 'none'}"
        )
    return name, version


def _known_models(client: MlflowClient) -> str:
    names = [m.name for m in client.search_registered_models(max_results=20)]
    return ", ".join(names) or "none"


def _get(fetch: Callable[[], Any], message: str) -> Any:
    """fetch(), with MLflow's not-found error turned into ValueError(message)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return fetch()
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        raise ValueError(message) from None


def _download(source: _Source, uri: str, store: str, cache_dir: str | None) -> Path:
    """The downloaded files of `source`, cached by (store, artifact URI): registered
    versions, logged models and run artifacts do not change once written."""
    import mlflow
    from mlflow.exceptions import MlflowException

    root = Path(cache_dir) if cache_dir else _default_cache()
    key = hashlib.sha256(f"{store}|{source.artifact_uri}".encode()).hexdigest()[:20]
    target = root / key
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=source.artifact_uri, dst_path=str(tmp), tracking_uri=store, registry_uri=store
        )
        os.replace(tmp, target)  # atomic: a concurrent loader sees all the files or none
    except MlflowException as exc:
        raise ValueError(f"cannot download {uri} from {store}: {exc.message}") from exc
    except OSError:
        if not target.exists():  # else another loader finished the same download first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _object_store_file(uri: str, cache_dir: str | None) -> Path:
    """A local copy of the checkpoint or ONNX file at `uri` (or of ``checkpoint.pt`` in the
    folder `uri`), cached by object, size and modification time; credentials and endpoint come
    from the standard variables (AWS_ENDPOINT_URL, ...), as for every other rayssd path."""
    import pyarrow.fs as pafs

    from pipelines.data.sources import resolve_location, storage_error

    try:
        location = resolve_location(uri)
        info = location.filesystem.get_file_info(location.path)
        if info.type == pafs.FileType.Directory:
            location = location.join(checkpoint.FILE_NAME)
            info = location.filesystem.get_file_info(location.path)
    except ValueError as exc:
        raise ValueError(f"cannot read {uri}: {exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {uri}: {storage_error(exc)}") from None
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no checkpoint file or folder holding {checkpoint.FILE_NAME} at {uri}")
    root = Path(cache_dir) if cache_dir else _default_cache()
    # the object, however named
    key = f"{location.filesystem.type_name}|{location.path}|{info.size}|{info.mtime_ns}"
    target = root / hashlib.sha256(key.encode()).hexdigest()[:20] / info.base_name
    if target.is_file():
        return target
    try:
        location.download(target)  # whole or not at all: a concurrent loader never sees a part
    except OSError as exc:
        raise ValueError(f"cannot download {uri}: {storage_error(exc)}") from None
    return target


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rayssd" / "models"


def _find_checkpoint(root: Path, uri: str) -> Path:
    """The one ``checkpoint.pt`` under `root`, or the only file there (``runs:/<id>/x.pt``)."""
    files = [p for p in root.rglob("*") if p.is_file()]
    if len(files) == 1:
        return files[0]
    found = [p for p in files if p.name == checkpoint.FILE_NAME]
    if len(found) != 1:
        raise ValueError(
            f"{uri} holds {len(found) or 'no'} {checkpoint.FILE_NAME} files; expected exactly one "
            "(is it a rayssd model?)"
        )
    return found[0]

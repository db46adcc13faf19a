"""MLflow tracking that never stops training.

A `Tracker` wraps one MLflow run through `MlflowClient` (no global ``mlflow.start_run``
state, so trackers for several runs can live in one process). Any store, network or
server error is logged once as a warning and turns the tracker into a no-op: a training
job that took hours must not die because the tracking server went away.

A tracker is not sent to Ray workers; a worker re-opens the run from ``(uri, experiment,
run_id)`` with `Tracker.start`, which is cheap.

Logging a checkpoint as a model and registering it: `pipelines.track.registry.log_model`.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import requests

if TYPE_CHECKING:
    import PIL.Image
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# MLflow's defaults retry a dead server 7 times with exponential backoff (minutes); a
# tracking outage should cost a training job seconds. Used only where the user set nothing.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
PARAM_VALUE_LIMIT = 6000  # MAX_PARAM_VAL_LENGTH; longer values are rejected by the server
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


def tracking_uri(uri: str | None = None) -> str:
    """`uri`, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    Local stores (sqlite, file, plain paths) are made absolute, so Ray workers started in
    another working directory write to the same store.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:" and not path.startswith("/"):
            return f"sqlite:///{Path(path).resolve()}"
        return uri
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path).resolve().as_uri()
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a bare path (or a Windows drive letter)
        return Path(uri).resolve().as_uri()
    return uri


def check_reachable(uri: str, timeout_s: float = 3.0) -> str | None:
    """None when the tracking store at `uri` looks usable, else a short reason.

    http(s): ``GET <uri>/health`` within `timeout_s`; sqlite and file stores: the directory
    exists and is writable. Other schemes are not checked (None).
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            response = requests.get(url, timeout=timeout_s)
        except requests.RequestException as exc:
            return f"no answer from {url} within {timeout_s:g} s ({type(exc).__name__})"
        if response.status_code != 200:
            return f"{url} answered HTTP {response.status_code}"
        return None
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        return _writable(path if path.exists() else path.parent, "sqlite database")
    if parsed.scheme == "file":
        path = Path(parsed.path)
        return _writable(path if path.exists() else path.parent, "file store")
    return None


def _writable(path: Path, what: str) -> str | None:
    if not path.exists():
        return f"{what} directory {path} does not exist"
    if not os.access(path, os.W_OK):
        return f"{what} {path} is not writable"
    return None


def _bound_http_retries() -> None:
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


class Tracker:
    """One MLflow run; every method is a no-op once `enabled` is False."""

    def __init__(
        self,
        uri: str,
        client: MlflowClient | None = None,
        run_id: str | None = None,
        experiment_id: str | None = None,
        experiment: str | None = None,
    ) -> None:
        self.uri = uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.experiment = experiment
        self._client = client

    @property
    def enabled(self) -> bool:
        return self._client is not None and self.run_id is not None

    @property
    def client(self) -> MlflowClient | None:
        """The underlying client (None when disabled), for reads the tracker does not wrap."""
        return self._client

    @classmethod
    def disabled(cls, uri: str = "") -> Tracker:
        """A tracker that logs nothing (tracking switched off by the user)."""
        return cls(uri)

    @classmethod
    def start(
        cls,
        *,
        uri: str,
        experiment: str,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
    ) -> Tracker:
        """Start a run in `experiment` (created if needed), or re-open `run_id` (its status
        goes back to RUNNING; `experiment` is then ignored: the run keeps its own).

        Never raises for tracking problems: warns and returns a disabled tracker.
        """
        uri = tracking_uri(uri)
        _bound_http_retries()
        reason = check_reachable(uri)
        if reason is not None:
            _warn_disabled(uri, "starting a run", reason)
            return cls(uri, experiment=experiment)
        try:
            return cls._open(uri, experiment, run_name, tags, run_id)
        except Exception as exc:  # any store, network or server error: training goes on untracked
            _warn_disabled(uri, "starting a run", f"{type(exc).__name__}: {exc}")
            return cls(uri, experiment=experiment)

    @classmethod
    def _open(
        cls,
        uri: str,
        experiment: str,
        run_name: str | None,
        tags: dict[str, str] | None,
        run_id: str | None,
    ) -> Tracker:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        if run_id is not None:
            run = client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            tracker = cls(uri, client, run_id, run.info.experiment_id, experiment)
            if tags:
                tracker.set_tags(tags)
            return tracker
        experiment_id = _experiment_id(client, experiment, uri)
        run = client.create_run(experiment_id, run_name=run_name, tags=_run_tags(tags))
        return cls(uri, client, run.info.run_id, experiment_id, experiment)

    def __getstate__(self) -> Any:
        raise TypeError(
            "a Tracker is not sent to other processes; pass (tracker.uri, tracker.experiment, "
            "tracker.run_id) and call Tracker.start(..., run_id=run_id) there"
        )

    def safely(self, action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), or None after warning and disabling if it fails."""
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # tracking must never stop training: any store, network or server error
            _warn_disabled(self.uri, action, f"{type(exc).__name__}: {exc}", self.run_id)
            self._client = None
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (values str()-ed, truncated to MLflow's limit), in batches.

        Params are immutable in MLflow: ones the run already holds with the same value are
        skipped; ones with a different value (a resumed run with a changed setting) are
        skipped with a warning instead of failing the whole batch.
        """
        self.safely("logging params", self._log_params, params)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        values = {str(k): _param_value(v) for k, v in params.items()}
        existing = self._client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
        if changed:
            log.warning(
                "MLflow run %s already has params %s with other values; keeping the old ones",
                self.run_id,
                ", ".join(changed),
            )
        new = [Param(k, v) for k, v in values.items() if k not in existing]
        for i in range(0, len(new), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[i : i + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric values at `step`; others (strings, lists, None) are skipped."""
        self.safely("logging metrics", self._log_metrics, metrics, step)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(str(k), value, now, int(step))
            for k, v in metrics.items()
            if (value := _number(v)) is not None
        ]
        for i in range(0, len(rows), METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=rows[i : i + METRICS_PER_BATCH])

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.safely("logging an artifact", self._client_call("log_artifact"), local_path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.safely("logging text", self._client_call("log_text"), text, artifact_file)

    def log_image(self, image: PIL.Image.Image, artifact_file: str) -> None:
        self.safely("logging an image", self._client_call("log_image"), image, artifact_file=artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib figure as an image file (format from the file's extension)."""
        self.safely("logging a figure", self._client_call("log_figure"), figure, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.safely("setting tags", self._set_tags, tags)

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        rows = [RunTag(str(k), str(v)) for k, v in tags.items()]
        for i in range(0, len(rows), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=rows[i : i + PARAMS_PER_BATCH])

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
        self.safely("ending the run", self._client_call("set_terminated"), status)

    def _client_call(self, method: str) -> Callable[..., Any]:
        """A client method with this run's id bound first (resolved only when enabled)."""
        return lambda *args, **kwargs: getattr(self._client, method)(self.run_id, *args, **kwargs)


def _warn_disabled(uri: str, action: str, reason: str, run_id: str | None = None) -> None:
    run = f" (run {run_id})" if run_id else ""
    log.warning(
        "MLflow tracking at %s%s: %s failed: %s. Training goes on without tracking.", uri, run, action, reason
    )


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
    except MlflowException:  # another worker created it between our two calls
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a new experiment in a sqlite store go next to the database
    (``<db dir>/mlruns/<experiment>``). MLflow's default, ``./mlruns``, depends on the working
    directory of whichever process creates the experiment (a test, a Ray worker)."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None  # servers and file stores have their own artifact roots
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", experiment).strip(".") or "experiment"
    return str(Path(uri[len("sqlite:///") :]).parent / "mlruns" / folder)


def _run_tags(tags: dict[str, str] | None) -> dict[str, str]:
    """User tags plus what ``mlflow.start_run`` would add (user, source file, git commit)."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags({str(k): str(v) for k, v in (tags or {}).items()})


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 3] + "..."


def _number(value: Any) -> float | None:
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d numpy array or tensor
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) else None
    return None

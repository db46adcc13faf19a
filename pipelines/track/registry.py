"""Checkpoints as MLflow models: `log_model` logs one as a pyfunc model with models-from-code
(`pipelines/track/pyfunc.py`, so nothing is pickled) in a `Tracker`'s run, registers it and
moves the ``champion`` alias only when it passes the champion gate: its overall metric beats
the holder's and no class's AP drops by more than ``max_class_drop`` against the holder's.

Per-class APs travel as the checkpoint metrics ``ap.<class>`` (`class_metrics`, logged per
epoch by training) and as the registered version's tag ``per_class_ap`` (JSON), which the
next version's gate reads. The decision, with every class's delta, is the new version's
tag ``champion_gate`` and the artifact ``champion_gate.txt`` of its run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipelines.track.tracker import Tracker
from ssd import config as C

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name inside its run
MAX_CLASS_DROP = 0.05  # the most a class's AP may fall against the champion's
CLASS_METRIC_PREFIX = "ap."
PER_CLASS_TAG = "per_class_ap"
GATE_TAG = "champion_gate"
GATE_FILE = "champion_gate.txt"
MODEL_CODE = Path(__file__).with_name("pyfunc.py")
SSD_PACKAGE = Path(__file__).resolve().parents[2] / "ssd"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str  # registered model name
    version: str  # the new version
    metric: str  # what decides the alias, e.g. "map"
    value: float  # the new version's metric (nan when the checkpoint lacks it)
    champion: bool  # the alias now points at the new version
    previous_champion: str | None  # version that held the alias before, if any
    gate: dict[str, Any] | None = None  # `champion_gate`'s decision, with per-class deltas


def class_metrics(per_class: dict[str, float]) -> dict[str, float]:
    """Per-class AP {class name: AP} as metrics ``ap.<name>`` (characters MLflow keys may not
    hold become ``_``)."""
    return {CLASS_METRIC_PREFIX + re.sub(r"[^\w.\- :/]", "_", k): float(v) for k, v in per_class.items()}


def class_aps(metrics: dict[str, Any]) -> dict[str, float]:
    """The ``ap.<name>`` entries of a checkpoint's metrics, as {name: AP}."""
    return {
        key[len(CLASS_METRIC_PREFIX) :]: float(value)
        for key, value in metrics.items()
        if key.startswith(CLASS_METRIC_PREFIX) and isinstance(value, (int, float))
    }


def champion_gate(
    metric: str,
    value: float,
    per_class: dict[str, float],
    holder: dict[str, Any] | None,
    max_class_drop: float = MAX_CLASS_DROP,
) -> dict[str, Any]:
    """Whether a new version with overall `metric` = `value` and APs `per_class` takes the
    alias from `holder` ({version, value, per_class (None when unknown)}, None when there is
    none). It does when there is no holder, or when `value` beats the holder's and no class
    both have lost more than `max_class_drop` AP. Returns the decision: ``promote``,
    ``reason``, and ``classes`` [{class, champion, new, delta, regressed}] of the classes both
    know."""
    decision: dict[str, Any] = {
        "promote": True,
        "metric": metric,
        "value": value,
        "max_class_drop": max_class_drop,
        "champion_version": None,
        "champion_value": None,
        "classes": [],
    }
    if holder is None:
        return {**decision, "reason": "no champion yet"}
    decision.update(champion_version=holder["version"], champion_value=holder["value"])
    theirs = holder.get("per_class")
    if theirs:
        for name in sorted(set(theirs) & set(per_class)):
            delta = per_class[name] - theirs[name]
            decision["classes"].append(
                {
                    "class": name,
                    "champion": theirs[name],
                    "new": per_class[name],
                    "delta": delta,
                    "regressed": delta < -max_class_drop,
                }
            )
    regressed = [c["class"] for c in decision["classes"] if c["regressed"]]
    better = not math.isnan(value) and (math.isnan(holder["value"]) or value > holder["value"])
    if not better:
        reason = f"{metric} {value:.4f} does not beat the champion's {holder['value']:.4f}"
    elif regressed:
        reason = (
            f"{metric} {value:.4f} beats {holder['value']:.4f}, but AP drops by more than "
            f"{max_class_drop:g} for {', '.join(regressed)}"
        )
    else:
        reason = f"{metric} {value:.4f} beats {holder['value']:.4f}" + (
            f" and no class drops by more than {max_class_drop:g}"
            if theirs
            else " (the champion has no per-class AP to compare)"
        )
    return {**decision, "promote": better and not regressed, "reason": reason}


def format_gate(decision: dict[str, Any]) -> str:
    """The decision as a few lines: the verdict and a table of per-class deltas."""
    verdict = "promoted" if decision["promote"] else "not promoted"
    lines = [f"champion gate: {verdict}: {decision['reason']}"]
    if decision["classes"]:
        lines.append(f"  {'class':<24} {'champion':>9} {'new':>9} {'delta':>9}")
        for c in decision["classes"]:
            flag = "  <- drops more than the limit" if c["regressed"] else ""
            numbers = f"{c['champion']:>9.4f} {c['new']:>9.4f} {c['delta']:>+9.4f}"
            lines.append(f"  {c['class'][:24]:<24} {numbers}{flag}")
    return "\n".join(lines)


def log_model(
    tracker: Tracker,
    checkpoint_file: str,
    *,
    register_as: str | None,
    metric: str = "map",
    alias: str = "champion",
    max_class_drop: float = MAX_CLASS_DROP,
) -> RegisteredVersion | None:
    """Log an inference checkpoint as the pyfunc model ``model`` of the tracker's run and,
    with `register_as`, register it and move `alias` to it if it passes `champion_gate`
    against the holder (its `metric` beats the holder's and no class's AP drops by more than
    `max_class_drop`).

    Returns the registered version (None when not registering, when the tracker is
    disabled, or when logging failed, which is warned). A missing or invalid checkpoint
    file is the caller's bug and raises (FileNotFoundError / ValueError).
    """
    from ssd import checkpoint

    if not tracker.enabled:
        return None
    ckpt = checkpoint.load(checkpoint_file)
    cfg = checkpoint.config_of(ckpt)
    value = float(ckpt.get("metrics", {}).get(metric, float("nan")))
    tags = {"config": cfg.name, metric: str(value), "epoch": str(ckpt["epoch"]), "step": str(ckpt["step"])}
    per_class = class_aps(ckpt.get("metrics", {}))
    logged = tracker.safely(
        "logging the model", _log_pyfunc, tracker, Path(checkpoint_file), cfg.inference.max_detections, tags
    )
    if logged is None or register_as is None:
        return None
    if per_class:
        tags[PER_CLASS_TAG] = json.dumps({k: round(v, 6) for k, v in per_class.items()})
    gate = {"per_class": per_class, "max_class_drop": max_class_drop}
    return tracker.safely(
        "registering the model", _register, tracker, register_as, logged, metric, value, alias, tags, gate
    )


def _log_pyfunc(tracker: Tracker, checkpoint_file: Path, max_detections: int, tags: dict[str, str]) -> Any:
    """Log the model by hand with the tracker's client (``mlflow.pyfunc.log_model`` would use
    the global tracking URI and experiment). Returns the `mlflow.entities.LoggedModel`."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    client = tracker.client
    logged = client.create_logged_model(
        tracker.experiment_id, name=MODEL_NAME, source_run_id=tracker.run_id, tags=tags
    )
    with tempfile.TemporaryDirectory(prefix="rayssd-model-") as tmp:
        source = _named_checkpoint(checkpoint_file, Path(tmp))
        local = Path(tmp) / MODEL_NAME
        with warnings.catch_warnings():
            # We give a signature; an input example would load and run the model at every log.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            _save_pyfunc(local, source, max_detections, tracker.run_id, logged)
        for pycache in local.rglob("__pycache__"):
            shutil.rmtree(pycache, ignore_errors=True)
        client.log_model_artifacts(logged.model_id, str(local))
    client.log_outputs(tracker.run_id, [LoggedModelOutput(logged.model_id, step=int(tags["step"]))])
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def _save_pyfunc(local: Path, source: Path, max_detections: int, run_id: str, logged: Any) -> None:
    import mlflow
    from mlflow.models import Model

    mlflow.pyfunc.save_model(
        path=str(local),
        python_model=str(MODEL_CODE),
        artifacts={"checkpoint": str(source)},
        code_paths=[str(SSD_PACKAGE)],  # the loader imports ssd: ship it with the model
        signature=_signature(max_detections),
        pip_requirements=_requirements(),  # inferring them would import the model in a subprocess
        mlflow_model=Model(
            artifact_path=logged.artifact_location,
            model_uuid=logged.model_id,
            model_id=logged.model_id,
            run_id=run_id,
        ),
    )


def _named_checkpoint(checkpoint_file: Path, tmp: Path) -> Path:
    """The checkpoint under the name `pipelines.track.models.load_model` looks for."""
    from ssd.checkpoint import FILE_NAME

    if checkpoint_file.is_dir():
        checkpoint_file = checkpoint_file / FILE_NAME
    if checkpoint_file.name == FILE_NAME:
        return checkpoint_file
    copy = tmp / "checkpoint" / FILE_NAME
    copy.parent.mkdir()
    shutil.copyfile(checkpoint_file, copy)
    return copy


def _signature(max_detections: int) -> Any:
    """A column ``image`` of encoded image bytes in (base64 in JSON); per image boxes [K, 4]
    xyxy in its own pixels, scores [K], labels [K], class names [K] and its size out; params
    ``score_threshold`` and ``max_detections`` (the model's own default)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image")]),
        outputs=Schema(
            [
                ColSpec(Array(Array(DataType.float)), "boxes"),
                ColSpec(Array(DataType.float), "scores"),
                ColSpec(Array(DataType.long), "labels"),
                ColSpec(Array(DataType.string), "names"),
                ColSpec(DataType.long, "width"),
                ColSpec(DataType.long, "height"),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("score_threshold", DataType.float, C.ANSWER_SCORE_THRESHOLD),
                ParamSpec("max_detections", DataType.long, max_detections),
            ]
        ),
    )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("mlflow", "torch", "torchvision", "numpy", "pandas", "pyyaml", "pillow"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def _register(
    tracker: Tracker,
    name: str,
    logged: Any,
    metric: str,
    value: float,
    alias: str,
    tags: dict[str, str],
    gate: dict[str, Any],
) -> RegisteredVersion:
    """Register the logged model; `alias` moves only to a version that passes `champion_gate`
    (the decision is tagged on the version, written to its run and logged).

    Two jobs finishing at the same moment can both see the old holder; the later alias
    write wins. Rare enough for a training registry; a lock would need a second store.
    """
    client = tracker.client
    _ensure_registered_model(client, name)
    # A server resolves a models:/m-<id> source with its own store; a local (sqlite) registry
    # in MLflow 3.17 resolves it through the *global* tracking URI instead (and fails, or
    # creates ./mlflow.db), so local stores get the model's artifact location.
    remote = urlparse(tracker.uri).scheme in ("http", "https")
    source = f"models:/{logged.model_id}" if remote else logged.artifact_location
    version = client.create_model_version(
        name, source=source, run_id=tracker.run_id, tags=tags, model_id=logged.model_id
    )
    holder = _alias_holder(client, name, alias)
    previous = holder.version if holder is not None else None
    decision = champion_gate(
        metric,
        value,
        gate["per_class"],
        None if holder is None else _holder(holder, metric),
        gate["max_class_drop"],
    )
    champion = decision["promote"]
    if champion:
        client.set_registered_model_alias(name, alias, version.version)
    text = format_gate(decision)
    finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in decision.items()}
    client.set_model_version_tag(name, version.version, GATE_TAG, json.dumps(finite))
    tracker.log_text(text + "\n", GATE_FILE)
    log.info(
        "registered %s version %s (%s=%.4g); %s %s\n%s",
        name,
        version.version,
        metric,
        value,
        alias,
        "moved to it" if champion else f"stays on version {previous}",
        text,
    )
    return RegisteredVersion(name, str(version.version), metric, value, champion, previous, decision)


def _holder(holder: Any, metric: str) -> dict[str, Any]:
    """The alias holder as `champion_gate` takes it. A holder without a tagged metric (set by
    hand) is never displaced, a NaN one always is; one without per-class APs is compared
    overall only."""
    try:
        per_class = json.loads(holder.tags.get(PER_CLASS_TAG, "null"))
    except ValueError:
        per_class = None
    return {"version": str(holder.version), "value": _tagged(holder.tags, metric), "per_class": per_class}


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        client.create_registered_model(name)


def _alias_holder(client: MlflowClient, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        if alias in client.get_registered_model(name).aliases:
            raise  # the alias exists, so this was some other failure
        return None


def _tagged(tags: dict[str, str], metric: str) -> float:
    """The holder's tagged metric; a holder without one (set by hand) is never displaced,
    a NaN one always is."""
    try:
        value = float(tags[metric])
    except (KeyError, ValueError):
        return float("inf")
    return float("-inf") if value != value else value

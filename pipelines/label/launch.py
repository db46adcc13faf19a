"""The labelling stage as commands run it: `rayssd label` and `rayssd evaluate`, typed.

`label(LabelOptions)` checks the input, the model and the output directory before Ray starts,
sizes the detection actors to the cluster, labels the source (`batch.label_source`) and logs
the run to MLflow with the model version it used. `evaluate(EvaluateOptions)` scores a model
on a labelled source (`batch.evaluate_dataset`). Both print what they do and return the
summary; `jobs/label.py` and `jobs/evaluate.py` only turn arguments into options.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

from pipelines.common import start_ray

log = logging.getLogger(__name__)

EVALUATE_SPLITS = ("val", "train", "all")


@dataclasses.dataclass(frozen=True)
class LabelOptions:
    """What `rayssd label` was asked for."""

    model: str  # checkpoint path or MLflow model URI
    input: str  # image folder, COCO file or VOC root (path or URI)
    out: str  # output directory (path or URI)
    overwrite: bool = False
    evaluate: bool = False  # also COCO mAP against the input's ground truth
    batch_size: int = 32
    workers: int | None = None  # default: one per GPU of the cluster, else one per CPU
    cpus_per_worker: float | None = None  # default: `batch.detector_cpus`
    gpus_per_worker: float | None = None  # default: 1 when the cluster has GPUs, else 0
    score_threshold: float | None = None  # default: the model's inference.score_threshold
    formats: tuple[str, ...] = ()  # also write the detections as these datasets (coco-dataset, yolo)
    min_score: float | None = None  # of a detection in those datasets; default datasets.DEFAULT_MIN_SCORE
    strict: bool = False
    experiment: str = "rayssd-label"
    run_name: str | None = None  # default: label-YYYYmmdd-HHMMSS
    tracking: bool = True
    tracking_uri: str | None = None
    address: str | None = None

    def check(self) -> None:
        """ValueError naming the option when a number is out of range."""
        if self.batch_size < 1 or (self.workers is not None and self.workers < 1):
            raise ValueError(
                f"--batch-size {self.batch_size} and --workers {self.workers}: expected >= 1 each"
            )
        if (self.cpus_per_worker is not None and self.cpus_per_worker <= 0) or (
            self.gpus_per_worker is not None and self.gpus_per_worker < 0
        ):
            raise ValueError(
                f"--cpus-per-worker {self.cpus_per_worker} and --gpus-per-worker {self.gpus_per_worker}: "
                "expected CPUs > 0 and GPUs >= 0"
            )
        from pipelines.label.datasets import FORMATS

        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"--format {unknown[0]}: expected one of {', '.join(FORMATS)}")
        if self.min_score is not None:
            if not self.formats:
                raise ValueError("--min-score selects the detections of --format datasets; pass --format too")
            if not 0.0 <= self.min_score <= 1.0:
                raise ValueError(f"--min-score {self.min_score}: expected a score in [0, 1]")


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
    """What `rayssd evaluate` was asked for."""

    model: str
    data: str  # COCO file or VOC root (path or URI)
    split: str | None = None  # val, train or all; default: all of a COCO file, val of a VOC root
    batch_size: int = 32
    workers: int = 2  # at most this many detection workers
    out: str | None = None  # also write the metrics as JSON here
    strict: bool = False
    tracking_uri: str | None = None
    address: str | None = None


# --- rayssd label ----------------------------------------------------------------------------


def label(o: LabelOptions) -> dict[str, Any]:
    """Label `o.input` into `o.out` (see `batch.label_source` for the files and the summary)."""
    import ray

    from pipelines.data.sources import open_source
    from pipelines.label.batch import detector_cpus, label_source, require_labelled_source
    from pipelines.label.datasets import DEFAULT_MIN_SCORE
    from pipelines.label.outputs import check_output
    from pipelines.track.models import load_model

    o.check()
    # Everything that can be wrong with the input, the model or DIR fails here, before Ray starts.
    probe = (require_labelled_source if o.evaluate else open_source)(o.input)  # parsed once
    model = load_model(o.model, tracking_uri=o.tracking_uri)
    check_output(o.out, overwrite=o.overwrite)
    start_ray(o.address)
    cluster = ray.cluster_resources()
    gpus = o.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    workers = o.workers or int(cluster.get("GPU", 0) if gpus else cluster.get("CPU", 1)) or 1
    cpus = o.cpus_per_worker or detector_cpus(cluster.get("CPU", 0.0), workers)
    _check_fits(cluster, cpus, gpus)
    tracker = _start_tracking(o, model, workers, cpus, gpus)
    print(f"labelling {o.input} with {model.label} into {o.out}", flush=True)
    try:
        summary = label_source(
            probe,
            model,
            o.out,
            batch_size=o.batch_size,
            workers=workers,
            num_cpus=cpus,
            num_gpus=gpus,
            tracking_uri=o.tracking_uri,
            evaluate=o.evaluate,
            strict=o.strict,
            overwrite=o.overwrite,
            score_threshold=o.score_threshold,
            dataset_formats=o.formats,
            min_score=DEFAULT_MIN_SCORE if o.min_score is None else o.min_score,
            mlflow_run={"uri": tracker.uri, "run_id": tracker.run_id} if tracker.enabled else None,
        )
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    _log_outcome(tracker, summary)
    print(format_label_summary(summary))
    if tracker.enabled:
        print(f"MLflow run {tracker.run_id} at {tracker.uri}")
    return summary


def _check_fits(cluster: dict[str, float], cpus: float, gpus: float) -> None:
    """A detection actor that no node can hold would leave the job waiting forever."""
    from pipelines.label.batch import DECODE_CPUS, WRITE_CPUS

    if gpus > cluster.get("GPU", 0):
        raise ValueError(f"--gpus-per-worker {gpus:g} but the Ray cluster has {cluster.get('GPU', 0):g} GPUs")
    if cpus + DECODE_CPUS + WRITE_CPUS > cluster.get("CPU", 0):
        raise ValueError(
            f"--cpus-per-worker {cpus:g} leaves no room for the decode and write tasks "
            f"({DECODE_CPUS + WRITE_CPUS:g} CPU) on a Ray cluster of {cluster.get('CPU', 0):g} CPUs"
        )


def _start_tracking(o: LabelOptions, model: Any, workers: int, cpus: float, gpus: float) -> Any:
    from pipelines.track.tracker import Tracker, tracking_uri

    if not o.tracking:
        return Tracker.disabled()
    tags = {**model.lineage_tags("label"), "rayssd.input": o.input}
    tracker = Tracker.start(
        uri=tracking_uri(o.tracking_uri),
        experiment=o.experiment,
        run_name=o.run_name or time.strftime("label-%Y%m%d-%H%M%S"),
        tags=tags,
    )
    tracker.log_params(
        {
            **model.lineage_params(),
            "input": o.input,
            "out": o.out,
            "batch_size": o.batch_size,
            "workers": workers,
            "cpus_per_worker": cpus,
            "gpus_per_worker": gpus,
            "score_threshold": o.score_threshold,
            "evaluate": o.evaluate,
        }
    )
    _link_model(tracker, model)
    return tracker


def _link_model(tracker: Any, model: Any) -> None:
    """Record the registered model version's logged model as an input of the run, so MLflow's
    UI links the two (params and tags hold the same lineage as text)."""
    if not (tracker.enabled and model.name and model.version):
        return
    from mlflow.entities import LoggedModelInput

    try:
        version = tracker.client.get_model_version(model.name, model.version)
        # A server's registry may not return model_id; its source is then models:/m-<id>.
        source = version.source or ""
        model_id = version.model_id or (
            source[len("models:/") :] if source.startswith("models:/m-") else None
        )
        if model_id:
            tracker.client.log_inputs(tracker.run_id, models=[LoggedModelInput(model_id)])
    except Exception as exc:  # any store or network error: the params already hold the lineage
        log.warning("could not link the run to model %s v%s: %s", model.name, model.version, exc)


def _log_outcome(tracker: Any, summary: dict[str, Any]) -> None:
    if not tracker.enabled:
        return
    numbers = {
        key: summary[key]
        for key in ("images", "errors", "skipped", "detections", "seconds", "images_per_s", "total_seconds")
    }
    metrics = summary["metrics"] or {}
    numbers.update({f"eval.{key}": value for key, value in metrics.items() if isinstance(value, float)})
    for fmt, written in (summary.get("datasets") or {}).items():
        numbers[f"{fmt}.annotations"] = written["annotations"]
    tracker.log_metrics(numbers, step=0)
    files = summary["files"]
    for name in ("samples.jpg", "summary.json", "errors.json", "images.json"):
        if "://" not in files[name]:
            tracker.log_artifact(files[name], "label")
        else:
            log.info("%s is remote; not copied into the MLflow run", files[name])
    tracker.end("FINISHED")


def format_label_summary(summary: dict[str, Any]) -> str:
    """A few lines: counts, speed, mAP with --evaluate, the first errors and where the files are."""
    lines = [
        f"labelled {summary['images']} images ({summary['errors']} unreadable, {summary['skipped']} "
        f"skipped non-image files): {summary['detections']} detections in {summary['seconds']:.1f} s "
        f"({summary['images_per_s']:.1f} images/s; {summary['total_seconds']:.1f} s in all)"
    ]
    metrics = summary["metrics"]
    if metrics:
        lines.append(
            f"mAP@[.5:.95] {metrics['map']:.4f}  mAP@0.5 {metrics['map50']:.4f}  "
            f"mAP@0.75 {metrics['map75']:.4f}"
        )
    lines += [f"  {e['path']}: {e['kind']}: {e['reason']}" for e in summary["first_errors"]]
    hidden = summary["errors"] + summary["skipped"] - len(summary["first_errors"])
    if hidden > 0:
        lines.append(f"  ... {hidden} more in errors.json")
    lines.append(
        f"outputs in {summary['out']}: labels/*.parquet, detections.json, images.json, errors.json, "
        "samples.jpg, summary.json"
    )
    for fmt, written in (summary.get("datasets") or {}).items():
        left_out = written.get("left_out") or []
        lines.append(
            f"{fmt}: {written['images']} images, {written['annotations']} objects scoring >= "
            f"{written['min_score']:g} in {written['file']}"
            + (f" (left out, a name stem taken in their folder: {', '.join(left_out)})" if left_out else "")
        )
    return "\n".join(lines)


# --- rayssd evaluate -------------------------------------------------------------------------


def evaluate(o: EvaluateOptions) -> dict[str, Any]:
    """COCO mAP of `o.model` on `o.data` (`batch.evaluate_dataset`'s metrics), printed as a table."""
    from pipelines.data.sources import checked_location
    from pipelines.label.batch import evaluate_dataset, require_labelled_source
    from pipelines.label.outputs import json_safe
    from pipelines.track.models import load_model

    if o.batch_size < 1 or o.workers < 1:
        raise ValueError(f"--batch-size {o.batch_size} and --workers {o.workers}: expected >= 1 each")
    if o.split is not None and o.split not in EVALUATE_SPLITS:
        raise ValueError(f"--split {o.split!r}: expected one of {', '.join(EVALUATE_SPLITS)}")
    probe = require_labelled_source(o.data)  # a bad source fails here, before Ray starts; parsed once
    split = o.split or ("all" if probe.kind == "coco" else "val")
    model = load_model(o.model, tracking_uri=o.tracking_uri)  # so does a bad model
    out = checked_location(o.out, "--out") if o.out else None  # and a bucket the metrics cannot reach
    start_ray(o.address)
    print(f"evaluating {model.label} on {o.data} (split {split})", flush=True)
    metrics = evaluate_dataset(
        probe,
        o.model,
        split=None if split == "all" else split,
        batch_size=o.batch_size,
        workers=(1, o.workers),
        tracking_uri=o.tracking_uri,
        strict=o.strict,
        model=model,
    )
    print(format_metrics_table(metrics))
    if out is not None:  # a local file or an object-store URI
        out.write_text(json.dumps(json_safe(metrics), indent=2, sort_keys=True))
        print(f"metrics written to {out.uri}")
    return metrics


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """The headline numbers and AP@0.5 per class, one per line."""
    lines = [
        f"{'mAP@[.5:.95]':16s} {metrics['map']:7.4f}",
        f"{'mAP@0.5':16s} {metrics['map50']:7.4f}",
        f"{'mAP@0.75':16s} {metrics['map75']:7.4f}",
        f"{'VOC07 mAP@0.5':16s} {metrics['voc07_map50']:7.4f}  (11-point)",
        f"{'VOC mAP@0.5':16s} {metrics['voc_map50']:7.4f}  (all-point)",
    ]
    voc07 = metrics.get("per_class_voc07", {})
    lines += [
        f"  AP@0.5 {name:16s} {ap:7.4f}  VOC07 {voc07.get(name, float('nan')):7.4f}"
        for name, ap in metrics["per_class50"].items()
    ]
    lines.append(
        f"{metrics['images']} images, {metrics['detections']} detections in {metrics['seconds']:.1f}s "
        f"({metrics['images_per_s']:.1f} images/s)"
    )
    return "\n".join(lines)

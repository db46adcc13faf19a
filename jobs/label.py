"""`rayssd label`: detect every image of a source with a trained model on Ray Data workers and
write the detections as Parquet and COCO results, logging the run to MLflow.

Also runs as ``ray job submit --working-dir . -- python -m jobs.label --model ... --input ... --out ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

from jobs.options import run_job
from pipelines.common import start_ray

log = logging.getLogger(__name__)

DESCRIPTION = """Label images with a trained model on Ray Data: decoding and resizing run as Ray tasks,
detection in a pool of model actors. SOURCE is a folder of images (searched recursively; files
without an image extension are skipped and listed), a COCO annotation file or a Pascal VOC root,
as a local path or a URI (s3://, gs://, ...). MODEL is a checkpoint file (or a folder holding
checkpoint.pt), runs:/RUN_ID/PATH, models:/NAME@ALIAS or models:/NAME/VERSION. DIR receives
labels/*.parquet (one row per image: image_id, path, width, height, boxes [K, 4] xyxy pixels,
scores, labels, category_ids, category_names), detections.json (COCO results), images.json (COCO
image info: image id -> path, and the categories), errors.json (images that could not be read, and
why), ingest_report.json, samples.jpg and summary.json. Folder images are numbered 0..N-1 in sorted
path order. The run is logged to MLflow with the model version it used."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="URI", help="checkpoint path or MLflow model URI")
    parser.add_argument(
        "--input", required=True, metavar="SOURCE", help="image folder, COCO .json or VOC root (path or URI)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (path or URI)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the outputs of an earlier run in DIR"
    )
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="also compute COCO mAP against the input's ground truth (COCO or VOC with the model's classes)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="images per batch (default: 32)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="detection actors (default: one per GPU of the Ray cluster, else one per CPU)",
    )
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        metavar="N",
        help="Ray CPUs per detection actor (default: up to 1, leaving half a CPU for the decode and "
        "write tasks); each actor runs max(1, int(N)) torch threads",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        metavar="N",
        help="GPUs per detection actor (default: 1 when the Ray cluster has GPUs, else 0)",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        metavar="S",
        help="keep detections scoring above S (default: the model's inference.score_threshold)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first unreadable image, naming the file"
    )
    parser.add_argument(
        "--experiment", default="rayssd-label", help="MLflow experiment (default: rayssd-label)"
    )
    parser.add_argument("--run-name", help="MLflow run name (default: label-YYYYmmdd-HHMMSS)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log an MLflow run")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI for the run, runs:/ and models:/ (default: $MLFLOW_TRACKING_URI, "
        "else sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from pipelines.data.sources import open_source
    from pipelines.label.batch import detector_cpus, label_source, require_labelled_source
    from pipelines.label.outputs import check_output
    from pipelines.track.models import load_model

    _check_numbers(args)
    # Everything that can be wrong with the input, the model or DIR fails here, before Ray starts.
    probe = (require_labelled_source if args.evaluate else open_source)(args.input)  # parsed once
    model = load_model(args.model, tracking_uri=args.tracking_uri)
    check_output(args.out, overwrite=args.overwrite)
    start_ray(args.address)
    cluster = ray.cluster_resources()
    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    workers = args.workers or int(cluster.get("GPU", 0) if gpus else cluster.get("CPU", 1)) or 1
    cpus = args.cpus_per_worker or detector_cpus(cluster.get("CPU", 0.0), workers)
    _check_fits(cluster, cpus, gpus)
    tracker = _start_tracking(args, model, workers, cpus, gpus)
    print(f"labelling {args.input} with {_model_name(model)} into {args.out}", flush=True)
    try:
        summary = label_source(
            probe,
            model,
            args.out,
            batch_size=args.batch_size,
            workers=workers,
            num_cpus=cpus,
            num_gpus=gpus,
            tracking_uri=args.tracking_uri,
            evaluate=args.evaluate,
            strict=args.strict,
            overwrite=args.overwrite,
            score_threshold=args.score_threshold,
            mlflow_run={"uri": tracker.uri, "run_id": tracker.run_id} if tracker.enabled else None,
        )
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    _log_outcome(tracker, summary)
    print(format_summary(summary))
    if tracker.enabled:
        print(f"MLflow run {tracker.run_id} at {tracker.uri}")
    return summary


def _check_numbers(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or (args.workers is not None and args.workers < 1):
        raise ValueError(f"--batch-size {args.batch_size} and --workers {args.workers}: expected >= 1 each")
    if (args.cpus_per_worker is not None and args.cpus_per_worker <= 0) or (
        args.gpus_per_worker is not None and args.gpus_per_worker < 0
    ):
        raise ValueError(
            f"--cpus-per-worker {args.cpus_per_worker} and --gpus-per-worker {args.gpus_per_worker}: "
            "expected CPUs > 0 and GPUs >= 0"
        )


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


def _model_name(model: Any) -> str:
    if model.name:
        return f"{model.name} v{model.version}" if model.version else model.name
    return model.uri


def _start_tracking(args: argparse.Namespace, model: Any, workers: int, cpus: float, gpus: float) -> Any:
    from pipelines.track.tracker import Tracker, tracking_uri

    if args.no_tracking:
        return Tracker.disabled()
    tags = {"rayssd.job": "label", "rayssd.model_uri": model.uri, "rayssd.input": args.input}
    if model.version:
        tags["rayssd.model_version"] = f"{model.name}/{model.version}"
    tracker = Tracker.start(
        uri=tracking_uri(args.tracking_uri),
        experiment=args.experiment,
        run_name=args.run_name or time.strftime("label-%Y%m%d-%H%M%S"),
        tags=tags,
    )
    tracker.log_params(
        {
            "model.uri": model.uri,
            "model.name": model.name,
            "model.version": model.version,
            "model.run_id": model.run_id,
            "model.config": model.cfg.name,
            "input": args.input,
            "out": args.out,
            "batch_size": args.batch_size,
            "workers": workers,
            "cpus_per_worker": cpus,
            "gpus_per_worker": gpus,
            "score_threshold": args.score_threshold,
            "evaluate": args.evaluate,
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
    tracker.log_metrics(numbers, step=0)
    files = summary["files"]
    for name in ("samples.jpg", "summary.json", "errors.json", "images.json"):
        if "://" not in files[name]:
            tracker.log_artifact(files[name], "label")
        else:
            log.info("%s is remote; not copied into the MLflow run", files[name])
    tracker.end("FINISHED")


def format_summary(summary: dict[str, Any]) -> str:
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    run_job("label", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()

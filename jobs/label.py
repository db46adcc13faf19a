"""`rayssd label`: arguments → `LabelOptions` → `pipelines.label.launch.label`, which detects
every image of a source with a trained model on Ray Data workers, writes the detections as
Parquet and COCO results and logs the run to MLflow.

Also runs as ``ray job submit --working-dir . -- python -m jobs.label --model ... --input ... --out ...``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from jobs.options import run_job
from pipelines.label.datasets import DEFAULT_MIN_SCORE, FORMATS
from pipelines.label.launch import LabelOptions, label

DESCRIPTION = """Label images with a trained model on Ray Data: decoding and resizing run as Ray tasks,
detection in a pool of model actors. SOURCE is a folder of images (searched recursively; files
without an image extension are skipped and listed), a COCO annotation file, a YOLO dataset
YAML or a Pascal VOC root, as a local path or a URI (s3://, gs://, ...). MODEL is a checkpoint
file (or a folder holding checkpoint.pt), runs:/RUN_ID/PATH, models:/NAME@ALIAS or
models:/NAME/VERSION. DIR receives
labels/*.parquet (one row per image: image_id, path, width, height, boxes [K, 4] xyxy pixels,
scores, labels, category_ids, category_names), detections.json (COCO results), images.json (COCO
image info: image id -> path, and the categories), errors.json (images that could not be read, and
why), ingest_report.json, samples.jpg and summary.json. Folder images are numbered 0..N-1 in sorted
path order. With --format, DIR also receives the detections scoring at least --min-score as a
training dataset with its own copy of the images: coco-dataset/ (images/ and
annotations/instances_default.json, for rayssd train, CVAT and Label Studio) or yolo-dataset/
(images/, labels/ and data.yaml, for rayssd train and Ultralytics). MODEL may also be an ONNX file
from `rayssd export`, run on ONNX Runtime. The run is logged to MLflow with the model version it
used."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="URI",
        help="checkpoint path, MLflow model URI or ONNX file from rayssd export",
    )
    parser.add_argument(
        "--input",
        required=True,
        metavar="SOURCE",
        help="image folder, COCO .json, YOLO .yaml or VOC root (path or URI)",
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
        "--format",
        dest="formats",
        action="append",
        choices=FORMATS,
        default=[],
        help="also write the detections as a training dataset in DIR: coco-dataset or yolo (repeat for both)",
    )
    parser.add_argument(
        "--min-score",
        type=float,
        metavar="S",
        help=f"score a detection needs to enter a --format dataset (default: {DEFAULT_MIN_SCORE})",
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


def options(args: argparse.Namespace) -> LabelOptions:
    """The parsed arguments, typed."""
    return LabelOptions(
        model=args.model,
        input=args.input,
        out=args.out,
        overwrite=args.overwrite,
        evaluate=args.evaluate,
        batch_size=args.batch_size,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        score_threshold=args.score_threshold,
        formats=tuple(dict.fromkeys(args.formats)),
        min_score=args.min_score,
        strict=args.strict,
        experiment=args.experiment,
        run_name=args.run_name,
        tracking=not args.no_tracking,
        tracking_uri=args.tracking_uri,
        address=args.address,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    return label(options(args))


def main(argv: list[str] | None = None) -> None:
    run_job("label", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()

"""`rayssd evaluate`: arguments → `EvaluateOptions` → `pipelines.label.launch.evaluate` (COCO mAP
of a trained model on a labelled dataset, detected on Ray workers).

Also runs as ``ray job submit --working-dir . -- python -m jobs.evaluate --model ... --data ...``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from jobs.options import run_job
from pipelines.label.launch import EVALUATE_SPLITS, EvaluateOptions, evaluate

DESCRIPTION = """Detect every image of a labelled dataset (COCO annotation file, YOLO dataset YAML
or Pascal VOC root, local path or URI) with a trained model on Ray Data workers and score the
detections with pycocotools: mAP@[.5:.95], mAP@0.5, mAP@0.75 and AP@0.5 per class, and
Pascal VOC's AP@0.5 (VOC2007 11-point and all-point). MODEL is a checkpoint file
(or a folder holding checkpoint.pt), runs:/RUN_ID/PATH, models:/NAME@ALIAS or models:/NAME/VERSION.
A COCO file's train/val split is the seeded fraction split the model was trained with."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="URI", help="checkpoint path or MLflow model URI")
    parser.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="COCO annotation .json, YOLO dataset .yaml or Pascal VOC root (path or URI)",
    )
    parser.add_argument(
        "--split",
        choices=EVALUATE_SPLITS,
        help="split to evaluate; 'all' for the whole source (default: all of a COCO file, e.g. a val "
        "JSON; val of a VOC root or YOLO YAML)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="images per batch (default: 32)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, metavar="N", help="at most N detection workers (default: 2)"
    )
    parser.add_argument(
        "--out", metavar="FILE.json", help="also write the metrics to this JSON file (a path or an s3:// URI)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first data problem, naming the file"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)",
    )


def options(args: argparse.Namespace) -> EvaluateOptions:
    """The parsed arguments, typed."""
    return EvaluateOptions(
        model=args.model,
        data=args.data,
        split=args.split,
        batch_size=args.batch_size,
        workers=args.workers,
        out=args.out,
        strict=args.strict,
        tracking_uri=args.tracking_uri,
        address=args.address,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    return evaluate(options(args))


def main(argv: list[str] | None = None) -> None:
    run_job("evaluate", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()
